"""User-facing errors: one clear line naming the file and the problem."""

from __future__ import annotations  # the Slicer module imports this on Python 3.9 (Slicer 5.8)


class FewShotSAMError(Exception):
    """An error caused by the user's input or environment, shown as one line without a traceback."""


class Cancelled(FewShotSAMError):
    """The user cancelled a long-running operation; nothing was written."""

    def __init__(self, message: str = "cancelled by the user"):
        super().__init__(message)


class FewShotSAMWarning(UserWarning):
    """Input that works but will likely give a poor result (e.g. an MR model applied to a CT); shown as one line."""


def one_line(error: BaseException, limit: int | None = 200, with_type: bool = True) -> str:
    """An exception as one line of at most `limit` characters of its text (whitespace runs collapsed, so a
    library's multi-line message fits the one-line errors above), after its class name when with_type."""
    text = " ".join(str(error).split())[:limit]
    return f"{type(error).__name__}: {text}" if with_type else text
