"""Replace a file whole or not at all: the one temp-file-then-rename of the engine, its benchmarks and demo.

A writer writes to a hidden temporary file beside the target (same folder: same file system, so the rename is
atomic), and only a complete file is renamed onto the target. A reader, another process, or a crash, an exception,
Ctrl+C or kill -9 at any moment therefore sees the old file or the new one, never half of one. On an error the
temporary file is removed; only a killed process can leave one behind (hidden, named ``.<name>.<random>.partial<ext>``,
never mistaken for a result). It guards against processes dying, not against power loss (no fsync: the results
here can be recomputed, and syncing every embedding-cache header would cost more than it saves).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def temporary_beside(path: Path, ending: str | None = None) -> Path:
    """A fresh hidden name beside `path` that ends like it (writers such as SimpleITK, PIL and pynrrd choose the
    file format from the name): ending is the extension to keep, e.g. ".nii.gz" (default: the last suffix)."""
    ending = path.suffix if ending is None else ending
    stem = path.name[: len(path.name) - len(ending)] if ending and path.name.endswith(ending) else path.name
    return path.parent / f".{stem}.{uuid.uuid4().hex[:8]}.partial{ending}"


def write_atomically(path: str | os.PathLike, write_to: Callable[[Path], object], overwrite: bool = True,
                     ending: str | None = None) -> Path:
    """Call write_to(temporary), then rename the temporary file onto `path`; returns `path`.

    overwrite=False: raise FileExistsError, keeping the existing file, if `path` exists when the write is done
    (callers that refuse to overwrite check first too, so that they fail before the work; this catches a file
    that appeared meanwhile). Whatever write_to raises is raised after the temporary file is removed."""
    path = Path(path)
    temporary = temporary_beside(path, ending)
    try:
        write_to(temporary)
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} exists")
        os.replace(temporary, path)
    except BaseException:  # KeyboardInterrupt too: never leave the partial file behind
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write a text file (UTF-8) atomically, creating its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write_to(temporary: Path) -> None:
        with open(temporary, "x", encoding="utf-8") as stream:
            stream.write(text)

    return write_atomically(path, write_to, overwrite)
