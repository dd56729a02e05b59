"""Kept so that ``from FewShotSAMLib.atomic_text import write_text_atomically`` still works; see atomic_write.py."""

from .atomic_write import write_text_atomically  # noqa: F401
