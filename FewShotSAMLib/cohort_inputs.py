"""Which scans a cohort run segments, and where each one's result goes.

Inputs may be image files, globs ('archive/**/*.nii.gz', expanded here so that a shell's argument limit never
matters), folders (every image file below them, and every folder holding a DICOM series), and text or CSV lists of
paths (one a line; a CSV's "path" column, else its first column; relative paths are read from the list's folder).
"""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path

import SimpleITK as sitk

from .errors import FewShotSAMError
from .pipeline import output_name

GLOB_CHARACTERS = "*?["
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LIST_SUFFIXES = (".txt", ".csv")
# Segmentations, our own outputs and hidden temporary files are never scans.
NOT_SCAN_MARKERS = (".seg.nrrd", "_fewshotsam")


def is_glob(text: str) -> bool:
    return any(character in text for character in GLOB_CHARACTERS)


def find_scans(inputs: list[str], exclude: str | os.PathLike | None = None) -> list[Path]:
    """Every scan named by `inputs`, in the order given, each once. `exclude`: a folder never searched (the output
    folder, when it lies inside an input folder). Paths that do not exist are kept: they become failed rows."""
    scans: list[Path] = []
    for text in inputs:
        scans.extend(_expand(str(text), Path(exclude).resolve() if exclude else None))
    unique = {}
    for scan in scans:
        unique.setdefault(scan.resolve() if scan.exists() else scan.absolute(), scan)
    return list(unique.values())


def _expand(text: str, exclude: Path | None) -> list[Path]:
    path = Path(text).expanduser()
    if not path.exists() and is_glob(text):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise FewShotSAMError(f"no file or folder matches {text}")
        return [scan for match in matches for scan in _expand(match, exclude)]
    if path.is_file() and path.name.lower().endswith(LIST_SUFFIXES):
        return [scan for entry in read_path_list(path) for scan in _expand(str(entry), exclude)]
    if path.is_dir():
        return scans_in_folder(path, exclude)
    return [path]


def read_path_list(path: Path) -> list[Path]:
    """The paths in a text list (one a line, '#' comments) or a CSV (its "path" column, else its first column)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise FewShotSAMError(f"cannot read the list of scans {path}: {error}") from None
    if path.name.lower().endswith(".csv"):
        rows = [row for row in csv.reader(text.splitlines()) if row and any(cell.strip() for cell in row)]
        header = [cell.strip().lower() for cell in rows[0]] if rows else []
        column = header.index("path") if "path" in header else 0
        entries = [row[column].strip() for row in rows[1 if "path" in header else 0:] if len(row) > column]
    else:
        entries = [line.strip() for line in text.splitlines()]
    entries = [entry for entry in entries if entry and not entry.startswith("#")]
    if not entries:
        raise FewShotSAMError(f"the list of scans {path} names no scan")
    return [entry_path if entry_path.is_absolute() else path.parent / entry_path
            for entry_path in (Path(entry).expanduser() for entry in entries)]


def scans_in_folder(folder: Path, exclude: Path | None = None) -> list[Path]:
    """The folder itself when it holds a DICOM series; else every image file and DICOM series folder below it."""
    if holds_dicom_series(folder):
        return [folder]
    scans = []
    for root, folders, files in os.walk(folder):
        root_path = Path(root)
        folders[:] = sorted(name for name in folders if not name.startswith(".")
                            and (exclude is None or (root_path / name).resolve() != exclude))
        if root_path != folder and holds_dicom_series(root_path):
            scans.append(root_path)
            continue
        scans.extend(root_path / name for name in sorted(files) if is_image_file(name))
    if not scans:
        raise FewShotSAMError(f"folder {folder} holds no image file ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series")
    return scans


def is_image_file(name: str) -> bool:
    lower = name.lower()
    return (not lower.startswith(".") and lower.endswith(IMAGE_SUFFIXES)
            and not any(marker in lower for marker in NOT_SCAN_MARKERS))


def holds_dicom_series(folder: Path) -> bool:
    """Whether GDCM finds a DICOM series among the folder's own files (only asked when some file could be DICOM:
    asking costs a read of every file's header)."""
    try:
        names = [entry.name.lower() for entry in os.scandir(folder) if entry.is_file()]
    except OSError:
        return False
    if not any(not is_image_file(name) and not name.endswith(LIST_SUFFIXES) and not name.startswith(".")
               for name in names):
        return False
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def output_paths(scans: list[Path], out_dir: str | os.PathLike, suffix: str = ".seg.nrrd") -> list[Path]:
    """Where each scan's result is written: <out_dir>/<the scan's folder below the scans' common folder>/
    <name>_fewshotsam<suffix>. Scans of one folder land directly in out_dir, as `fewshotsam apply` writes them;
    an archive's patient folders are mirrored, so that two scans called image.nii.gz never share an output."""
    parents = [scan.absolute().parent for scan in scans]
    common = Path(os.path.commonpath([str(parent) for parent in parents])) if parents else Path(".")
    outputs = [Path(out_dir) / parent.relative_to(common) / output_name(scan, suffix)
               for scan, parent in zip(scans, parents)]
    seen: dict[Path, Path] = {}
    for scan, output in zip(scans, outputs):
        if output in seen:
            raise FewShotSAMError(f"{seen[output]} and {scan} would both be written to {output}; rename one")
        seen[output] = scan
    return outputs
