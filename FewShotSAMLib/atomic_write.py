"""Write a small text file so that no reader, and no crash mid-write, ever sees half of it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it onto `path` (same folder: same file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; these files are meant to be read
        os.replace(temporary, path)
    except BaseException:  # KeyboardInterrupt too: never leave the partial file behind
        Path(temporary).unlink(missing_ok=True)
        raise
