"""Which slices of a segment the user painted, as opposed to slices FewShotSAM filled in.

The engine treats every non-empty slice of its label input as a painted (trusted) slice. After a first
"Adapt & Propagate" a segment is filled through the volume, so sending it again as-is would tell the engine that
every slice was painted. To support the natural workflow "look at the result, paint one more slice where it is
wrong, propagate again", each propagated segment remembers, in a segment tag that is saved with the scene and in
.seg.nrrd files:

- the array axis the slices were stacked along and a fingerprint of the voxel grid,
- the slices that were painted,
- a checksum of every non-empty slice FewShotSAM wrote.

Next time, a non-empty slice counts as painted if it was painted before, or if its content no longer matches what
FewShotSAM wrote (the user edited it). Slices that still hold exactly the propagated content are left out of the
input, so the engine re-propagates them from the painted ones.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

TAG = "FewShotSAM.Propagation"
VERSION = "v1"


@dataclass
class PropagationRecord:
    axis: int
    grid: str
    painted: tuple[int, ...] = ()
    written: dict[int, str] = field(default_factory=dict)  # slice index -> checksum of what FewShotSAM wrote

    def toTag(self) -> str:
        # Tag values are saved in .seg.nrrd headers as "key:value|": keep ':' and '|' out of the text.
        painted = ",".join(str(i) for i in sorted(self.painted))
        written = ",".join(f"{i}/{c}" for i, c in sorted(self.written.items()))
        return f"{VERSION};axis={self.axis};grid={self.grid};painted={painted};written={written}"

    @classmethod
    def fromTag(cls, text: str | None) -> "PropagationRecord | None":
        if not text:
            return None
        parts = text.split(";")
        if not parts or parts[0] != VERSION:
            return None
        fields = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
        try:
            axis = int(fields["axis"])
            painted = tuple(int(i) for i in fields.get("painted", "").split(",") if i)
            written = {}
            for item in fields.get("written", "").split(","):
                if item:
                    index, checksum = item.split("/", 1)
                    written[int(index)] = checksum
            return cls(axis=axis, grid=fields.get("grid", ""), painted=painted, written=written)
        except (KeyError, ValueError):
            return None


def sliceIndex(axis: int, index: int) -> tuple:
    key = [slice(None)] * 3
    key[axis] = index
    return tuple(key)


def nonEmptySlices(mask: np.ndarray, axis: int) -> list[int]:
    other = tuple(a for a in range(3) if a != axis)
    return [int(i) for i in np.flatnonzero(np.asarray(mask).any(axis=other))]


def sliceChecksum(mask: np.ndarray, axis: int, index: int) -> str:
    data = np.packbits(np.ascontiguousarray(np.asarray(mask)[sliceIndex(axis, index)], dtype=bool))
    return f"{zlib.crc32(data.tobytes()):08x}"


def sliceChecksums(mask: np.ndarray, axis: int) -> dict[int, str]:
    return {i: sliceChecksum(mask, axis, i) for i in nonEmptySlices(mask, axis)}


def paintedSlices(mask: np.ndarray, axis: int, grid: str, record: PropagationRecord | None) -> list[int]:
    """Indices of the slices along `axis` that hold the user's painting (see the module description)."""
    candidates = nonEmptySlices(mask, axis)
    if record is None or record.axis != axis or record.grid != grid:
        return candidates  # never propagated on this grid and axis: everything there was painted
    painted = set(record.painted)
    return [i for i in candidates if i in painted or record.written.get(i) != sliceChecksum(mask, axis, i)]


def onlySlices(mask: np.ndarray, axis: int, indices) -> np.ndarray:
    """Copy of the mask that keeps only the given slices along `axis`."""
    kept = np.zeros_like(np.asarray(mask), dtype=bool)
    for index in indices:
        kept[sliceIndex(axis, index)] = np.asarray(mask)[sliceIndex(axis, index)]
    return kept


def copySlices(target: np.ndarray, source: np.ndarray, axis: int, indices) -> None:
    """In place: target slices `indices` along `axis` become the source's."""
    for index in indices:
        target[sliceIndex(axis, index)] = source[sliceIndex(axis, index)]


def changedSlices(before: np.ndarray, after: np.ndarray, axis: int) -> list[int]:
    other = tuple(a for a in range(3) if a != axis)
    return [int(i) for i in np.flatnonzero((np.asarray(before) != np.asarray(after)).any(axis=other))]


def readRecord(segment) -> PropagationRecord | None:
    if segment is None:
        return None
    import vtk  # only needed for the tag accessor; keeps the pure functions above importable without VTK

    value = vtk.reference("")
    if not segment.GetTag(TAG, value):
        return None
    return PropagationRecord.fromTag(str(value))


def writeRecord(segment, record: PropagationRecord | None) -> None:
    if record is None:
        segment.RemoveTag(TAG)
    else:
        segment.SetTag(TAG, record.toTag())
