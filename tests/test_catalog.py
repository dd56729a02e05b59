"""One catalogue of models, devices, encoder paths and slice planes: every list the user chooses from reads it."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import pytest

from FewShotSAMLib import catalog
from FewShotSAMLib.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]


def _option_choices(option: str) -> dict[str, tuple]:
    """The choices of `option` in every subcommand that has it: {subcommand: choices}."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found = {}
    for name, subparser in commands.choices.items():
        for action in subparser._actions:
            if option in action.option_strings:
                found[name] = tuple(action.choices)
    return found


@pytest.mark.parametrize("option, choices", [
    ("--model", catalog.values(catalog.MODELS)),
    ("--device", catalog.values(catalog.DEVICES)),
    ("--encoder", catalog.values(catalog.ENCODER_PATHS)),
    ("--axis", catalog.values(catalog.SLICE_PLANES)),
    ("--tuning-precision", catalog.values(catalog.TUNING_PRECISIONS)),
])
def test_every_command_offers_the_catalogue_choices(option, choices):
    found = _option_choices(option)
    expected = {"propagate", "adapt", "apply", "demo"} | ({"serve"} if option == "--device" else set())
    assert set(found) == expected
    assert all(offered == choices for offered in found.values()), found


def test_models_and_orientation_read_the_catalogue():
    from FewShotSAMLib import models, orientation

    assert models.MODEL_SPECS is catalog.MODELS
    assert models.ENCODER_PATHS == catalog.values(catalog.ENCODER_PATHS)
    assert tuple(orientation.PLANE_NORMALS) == catalog.values(catalog.SLICE_PLANES)
    assert catalog.DEFAULT_MODEL in catalog.MODELS and not catalog.MODELS[catalog.DEFAULT_MODEL].needs_checkpoint


def test_every_model_names_a_builder_that_takes_its_arguments():
    from FewShotSAMLib.models import build_parts  # noqa: F401  (the function that follows spec.builder)

    for spec in catalog.MODELS.values():
        module_name, function_name = spec.builder.split(":")
        builder = getattr(__import__(module_name, fromlist=[function_name]), function_name)
        inspect.signature(builder).bind(*spec.builder_args)  # raises TypeError on a mismatch


def test_unknown_choices_are_refused_with_the_catalogue_list():
    from FewShotSAMLib.errors import FewShotSAMError
    from FewShotSAMLib.models import load_model, resolve_device

    with pytest.raises(FewShotSAMError, match="auto, cpu, cuda, mps"):
        resolve_device("tpu")
    with pytest.raises(FewShotSAMError, match=", ".join(catalog.MODELS)):
        load_model("sam_vit_z")


def test_the_slicer_module_lists_agree_with_the_catalogue():
    """The Slicer module's menus (FewShotSAMSlicerLib/parameters.py) offer exactly the catalogue's choices."""
    pytest.importorskip("slicer", reason="the Slicer module's lists need slicer (pip install slicer-core)")
    module_dir = str(REPO_ROOT / "FewShotSAM")
    if module_dir not in sys.path:
        sys.path.insert(0, module_dir)
    from FewShotSAMSlicerLib import parameters

    assert parameters.MODELS == catalog.model_choices()
    assert tuple(parameters.MODELS_NEEDING_CHECKPOINT) == catalog.models_needing_checkpoint()
    assert catalog.values(parameters.DEVICES) == catalog.values(catalog.DEVICES)
    assert catalog.values(parameters.ORIENTATIONS) == catalog.values(catalog.SLICE_PLANES)
    assert parameters.PARAMETERS_BY_NAME["model"].default == catalog.DEFAULT_MODEL
