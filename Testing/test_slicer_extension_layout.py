"""The extension is laid out as Slicer's build expects, and its pieces agree with each other.

Checks the CMake files, the catalog entry, the Qt Designer file, the icons, the Qt-free rule of FewShotSAMSlicerLib,
the dependency list, and - with a small stand-in for Slicer's CMake macros - that a configured build tree holds the
module, its library, the effect and the FewShotSAMLib sub-package where Slicer imports them from.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree

import pytest
import tomllib
from PIL import Image
from slicer_extension_support import MODULE_DIR, REPO_ROOT

MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
ROOT_CMAKE = REPO_ROOT / "CMakeLists.txt"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "FewShotSAM.ui"


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not found"
    return [item.replace("${MODULE_NAME}", "FewShotSAM") for item in match.group(1).split()]


def test_root_cmakelists_is_an_extension():
    text = ROOT_CMAKE.read_text()
    assert re.search(r"^project\(FewShotSAM\)", text, re.M)
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({variable}\s", text), variable
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text), "torch comes from the PyTorch extension"
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    assert "add_subdirectory(FewShotSAM)" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text and "include(${Slicer_EXTENSION_CPACK})" in text


def test_catalog_entry():
    entry = json.loads((REPO_ROOT / "FewShotSAM.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == "Segmentation" and entry["scm_url"].startswith("https://")
    # the schema allows no other keys (description, homepage ... live in CMakeLists.txt)
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_type", "scm_url", "tier"}


def test_module_cmakelists_lists_every_file():
    text = MODULE_CMAKE.read_text()
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    for relative in scripts + resources:
        assert (MODULE_DIR / relative).is_file(), f"listed in CMake but missing: {relative}"
    # FewShotSAMWebApp is the browser front end (fewshotsam serve), run from a source checkout, not part of the
    # Slicer extension; it shares FewShotSAMSlicerLib, which the extension ships whole.
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py")
               if "__pycache__" not in p.parts and "FewShotSAMWebApp" not in p.parts}
    assert on_disk == set(scripts), f"not listed in CMake: {sorted(on_disk - set(scripts))}"
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert re.search(r"if\(BUILD_TESTING\)\s+.*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)
    assert "../${ENGINE_NAME}" in text or "../FewShotSAMLib" in text


def test_effect_is_registered_at_startup():
    source = (MODULE_DIR / "FewShotSAM.py").read_text()
    assert 'slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)' in source
    assert '"SegmentEditorFewShotSAMLib", "SegmentEditorEffect.py"' in source
    effect = (MODULE_DIR / "SegmentEditorFewShotSAMLib" / "SegmentEditorEffect.py").read_text()
    assert "class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect)" in effect
    assert "scriptedEffect.name = ee.EFFECT_NAME" in effect
    assert 'EFFECT_NAME = "Few-shot SAM"' in (MODULE_DIR / "FewShotSAMSlicerLib" / "editor_effect.py").read_text()
    assert "beforeModifyCallback=self.scriptedEffect.saveStateForUndo" in effect


def test_module_classes_exist():
    tree = ast.parse((MODULE_DIR / "FewShotSAM.py").read_text())
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["FewShotSAM"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["FewShotSAMWidget"]
    assert classes["FewShotSAMLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["FewShotSAMTest"] == ["ScriptedLoadableModuleTest"]


def test_ui_file_is_designer_xml_with_the_widgets_the_code_uses():
    root = ElementTree.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.find("class").text == "FewShotSAM"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    source = (MODULE_DIR / "FewShotSAM.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the widget uses no .ui widgets?"
    assert used <= set(widgets), f"used in FewShotSAM.py but not in the .ui: {sorted(used - set(widgets))}"
    for name, cls in (("sourceVolumeSelector", "qMRMLNodeComboBox"), ("segmentationSelector", "qMRMLNodeComboBox"),
                      ("modelComboBox", "QComboBox"), ("checkpointPathLineEdit", "ctkPathLineEdit"),
                      ("deviceComboBox", "QComboBox"), ("orientationComboBox", "QComboBox"),
                      ("propagateButton", "QPushButton"), ("cancelButton", "QPushButton"),
                      ("progressBar", "QProgressBar"), ("targetVolumeSelector", "qMRMLNodeComboBox")):
        assert widgets.get(name) == cls, name
    receivers = {c.find("receiver").text for c in root.iter("connection")}
    assert {"sourceVolumeSelector", "segmentationSelector", "targetVolumeSelector"} <= receivers


@pytest.mark.parametrize("relative, size", [("Resources/Icons/FewShotSAM.png", (128, 128)),
                                            ("SegmentEditorFewShotSAMLib/SegmentEditorEffect.png", (64, 64))])
def test_icons_are_real_pngs(relative, size):
    with Image.open(MODULE_DIR / relative) as image:
        assert image.format == "PNG" and image.size == size and image.mode == "RGBA"
        colors = image.getcolors(maxcolors=size[0] * size[1])
        assert len(colors) >= 5 and max(count for count, _ in colors) < 0.9 * size[0] * size[1]  # a drawing


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_slicer_lib_never_imports_qt():
    for path in sorted((MODULE_DIR / "FewShotSAMSlicerLib").glob("*.py")):
        assert not imported_modules(path) & {"qt", "ctk", "PythonQt"}, f"{path.name} imports Qt"


def test_engine_never_imports_slicer_or_qt():
    for path in sorted((REPO_ROOT / "FewShotSAMLib").rglob("*.py")):
        assert not imported_modules(path) & {"slicer", "qt", "ctk", "vtk", "vtkmodules"}, path.name


def test_dependency_list_matches_pyproject():
    from FewShotSAMSlicerLib import dependencies

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")

    declared = {name(r) for r in pyproject["project"]["dependencies"]}
    listed = {name(r.requirement) for r in dependencies.REQUIREMENTS}
    assert declared == listed, (f"pyproject only: {sorted(declared - listed)}; "
                                f"extension only: {sorted(listed - declared)}")


# ----------------------------------------------------------------------------------------------------------------
# Configure the extension with a stand-in for Slicer's CMake package and check the resulting module folder.
# ----------------------------------------------------------------------------------------------------------------
FAKE_USE_SLICER = textwrap.dedent(r"""
    # Stand-in for UseSlicer.cmake: the macros copy files at configure time, where Slicer's copy at build time.
    set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.13/qt-scripted-modules")
    set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
    macro(_fake_copy source_dir destination_dir)
      foreach(_file ${ARGN})
        if(NOT EXISTS "${source_dir}/${_file}")
          message(FATAL_ERROR "missing file: ${source_dir}/${_file}")
        endif()
        get_filename_component(_dir "${destination_dir}/${_file}" DIRECTORY)
        file(COPY "${source_dir}/${_file}" DESTINATION "${_dir}")
      endforeach()
    endmacro()
    macro(ctkMacroCompilePythonScript)
      cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET"
        "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
      if(NOT MY_SOURCE_DIR)
        set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
      endif()
      _fake_copy("${MY_SOURCE_DIR}" "${MY_DESTINATION_DIR}" ${MY_SCRIPTS} ${MY_RESOURCES})
      file(APPEND "${CMAKE_BINARY_DIR}/targets.txt" "${MY_TARGET_NAME}\n")
    endmacro()
    macro(slicerMacroBuildScriptedModule)
      cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
      if(MY_SLICER_UNPARSED_ARGUMENTS)
        message(FATAL_ERROR "Unknown keywords: ${MY_SLICER_UNPARSED_ARGUMENTS}")
      endif()
      ctkMacroCompilePythonScript(TARGET_NAME ${MY_SLICER_NAME} SCRIPTS "${MY_SLICER_SCRIPTS}"
        RESOURCES "${MY_SLICER_RESOURCES}"
        DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
        INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} NO_INSTALL_SUBDIR)
    endmacro()
    macro(slicer_add_python_unittest)
      cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
      file(APPEND "${CMAKE_BINARY_DIR}/tests.txt" "${MY_SCRIPT}\n")
    endmacro()
""")


def test_configured_build_tree_has_module_library_effect_and_engine(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    fake = tmp_path / "FakeSlicer"
    fake.mkdir()
    (fake / "UseSlicer.cmake").write_text(FAKE_USE_SLICER)
    (fake / "empty.cmake").write_text("")
    (fake / "SlicerConfig.cmake").write_text(
        f'set(Slicer_USE_FILE "{fake.as_posix()}/UseSlicer.cmake")\n'
        f'set(Slicer_EXTENSION_GENERATE_CONFIG "{fake.as_posix()}/empty.cmake")\n'
        f'set(Slicer_EXTENSION_CPACK "{fake.as_posix()}/empty.cmake")\n')
    build = tmp_path / "build"
    completed = subprocess.run(["cmake", "-S", str(REPO_ROOT), "-B", str(build), f"-DSlicer_DIR={fake}",
                                "-DBUILD_TESTING=ON"], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    modules = build / "lib" / "Slicer-5.13" / "qt-scripted-modules"
    assert (modules / "FewShotSAM.py").is_file()
    assert (modules / "Resources" / "UI" / "FewShotSAM.ui").is_file()
    assert (modules / "Resources" / "Icons" / "FewShotSAM.png").is_file()
    assert (modules / "FewShotSAMSlicerLib" / "logic.py").is_file()
    assert (modules / "SegmentEditorFewShotSAMLib" / "SegmentEditorEffect.py").is_file()
    assert (modules / "SegmentEditorFewShotSAMLib" / "SegmentEditorEffect.png").is_file()
    engine_files = {p.relative_to(REPO_ROOT / "FewShotSAMLib").as_posix()
                    for p in (REPO_ROOT / "FewShotSAMLib").rglob("*.py") if "__pycache__" not in p.parts}
    packaged = {p.relative_to(modules / "FewShotSAMLib").as_posix() for p in (modules / "FewShotSAMLib").rglob("*.py")}
    assert engine_files and engine_files == packaged
    for sample in (REPO_ROOT / "FewShotSAMLib" / "data" / "sample").glob("*"):  # package data, as in pyproject.toml
        assert (modules / "FewShotSAMLib" / "data" / "sample" / sample.name).is_file(), sample.name
    assert (build / "tests.txt").read_text().split() == ["FewShotSAM.py"]
    # From that folder alone (as Slicer and PythonSlicer see it), the library and the engine are found there.
    probe = ("import importlib.util, sys; import FewShotSAMSlicerLib.worker as w; "
             "spec = importlib.util.find_spec('FewShotSAMLib'); print(spec.submodule_search_locations[0])")
    completed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                               env={"PYTHONPATH": str(modules), "PYTHONNOUSERSITE": "1", "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == str(modules / "FewShotSAMLib")
