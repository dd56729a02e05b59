"""The "Few-shot SAM" Segment Editor effect (registered at startup by the FewShotSAM module)."""

from .SegmentEditorEffect import SegmentEditorEffect  # noqa: F401
