"""Turning a scan the user hands over (a path on the server, or uploaded files) into one readable volume file.

Used by the web app (FewShotSAMWebApp); no ``qt`` and no ``slicer`` import, so it is testable on its own.
Accepted: a .nrrd/.nhdr, .nii/.nii.gz or .mha/.mhd file, a folder holding a DICOM series, or a .zip of a DICOM
series (or of one such image file). Everything is checked by actually reading it with the engine's reader, so a
bad upload is refused with one line naming the file and the problem, before anything in the scene changes.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

from .errors import FewShotSAMSlicerError

IMAGE_SUFFIXES = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
UPLOAD_SUFFIXES = IMAGE_SUFFIXES + (".zip",)
# Largest total size unpacked from an upload: a zip bomb must not fill the server's disk.
MAX_UNPACKED_BYTES = 4 * 2**30


def safeFileName(name: str) -> str:
    """The base name of an uploaded file, with anything that could leave the upload folder removed."""
    base = os.path.basename(str(name).replace("\\", "/")).strip()
    base = re.sub(r"[^A-Za-z0-9._ -]", "_", base).lstrip(".")
    return base or "upload"


def _suffixOf(name: str, allowed) -> str | None:
    lower = name.lower()
    return next((suffix for suffix in sorted(allowed, key=len, reverse=True) if lower.endswith(suffix)), None)


def checkReadable(path: str | os.PathLike, shownName: str | None = None) -> str:
    """Read the scan with the engine's reader (3D, one component, finite voxels) or raise one readable line."""
    from FewShotSAMLib.errors import FewShotSAMError
    from FewShotSAMLib.volume_io import read_volume

    try:
        read_volume(path)
    except FewShotSAMError as error:
        raise FewShotSAMSlicerError(f"{shownName or os.path.basename(str(path))}: {error}") from None
    return str(path)


def _unzip(archive: Path, folder: Path, shownName: str) -> Path:
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
                raise FewShotSAMSlicerError(f"{shownName}: unpacks to more than {MAX_UNPACKED_BYTES // 2**30} GiB.")
            for number, member in enumerate(members):
                # Flat names: nothing from the archive decides where a file lands.
                target = folder / f"{number:06d}-{safeFileName(member.filename)}"
                with bundle.open(member) as source, open(target, "wb") as destination:
                    destination.write(source.read())
    except zipfile.BadZipFile:
        raise FewShotSAMSlicerError(f"{shownName}: not a readable .zip archive.") from None
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise FewShotSAMSlicerError(f"{shownName}: the archive holds no files.")
    images = [p for p in files if _suffixOf(p.name, IMAGE_SUFFIXES)]
    if len(images) == 1 and not _suffixOf(images[0].name, (".mhd", ".nhdr")):
        return images[0]
    return folder  # read as a DICOM series folder


def scanFromUpload(files: list[tuple[str, bytes]], folder: str | os.PathLike) -> str:
    """Write uploaded (name, content) files into `folder` and return the path of the scan they hold.

    One image file, a .zip (of a DICOM series or of one image file), or several DICOM files of one series.
    """
    if not files:
        raise FewShotSAMSlicerError("No file was uploaded.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [safeFileName(name) for name, _ in files]
    if len(files) == 1:
        name, content = names[0], files[0][1]
        suffix = _suffixOf(name, UPLOAD_SUFFIXES)
        if not content:
            raise FewShotSAMSlicerError(f"{name}: the file is empty.")
        path = folder / name
        path.write_bytes(content)
        if suffix == ".zip":
            unpacked = folder / "unzipped"
            unpacked.mkdir()
            return checkReadable(_unzip(path, unpacked, name), name)
        if suffix is None:
            raise FewShotSAMSlicerError(
                f"{name}: unknown file type; upload a .nrrd, .nii.gz, .nii, .mha file or a .zip of a DICOM series.")
        return checkReadable(path, name)
    series = folder / "series"
    series.mkdir()
    for number, (name, (_, content)) in enumerate(zip(names, files)):
        (series / f"{number:06d}-{name}").write_bytes(content)
    return checkReadable(series, f"the {len(files)} uploaded files")


def scanFromServerPath(path: str) -> str:
    """A scan path typed by the user (a file or a DICOM folder on the server), checked to be readable."""
    text = os.path.expanduser(str(path or "").strip())
    if not text:
        raise FewShotSAMSlicerError(
            "Type the path of a scan on the server (a .nrrd/.nii.gz/.mha file or a DICOM folder).")
    if not os.path.exists(text):
        raise FewShotSAMSlicerError(f"{text}: no such file or folder on the server.")
    if os.path.isfile(text) and _suffixOf(text, IMAGE_SUFFIXES) is None:
        raise FewShotSAMSlicerError(f"{text}: unknown file type; use .nrrd, .nii.gz, .nii, .mha or a DICOM folder.")
    return checkReadable(os.path.abspath(text), text)
