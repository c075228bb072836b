"""Turn a voxel grid to the closest canonical (RAS) axis order, and back exactly.

A scan stored in another axis order (an LSA or LAS volume) reaches the network turned by 90 or
180 degrees against the RAS training cases; plans with ``reorient: true`` turn every case to RAS
first, as nnU-Net's ``NibabelIOWithReorient`` does. Only whole-axis permutations and flips are
applied (nibabel's ``io_orientation``), never a resampling, so :func:`from_canonical` undoes
:func:`to_canonical` voxel for voxel and a prediction lands on the input's exact grid.
The turn is named by the input's axis codes (``"LSA"``); ``"RAS"`` means no turn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, ornt_transform

from lightseg.errors import ImageError

CANONICAL = "RAS"


def axis_codes(affine: np.ndarray) -> str:
    """The closest axis codes of a grid's affine, e.g. ``"LSA"``."""
    codes = aff2axcodes(np.asarray(affine, dtype=np.float64))
    if None in codes:
        raise ImageError(f"affine {np.asarray(affine).tolist()} has a zero voxel axis, so the image has no "
                         "orientation; fix the header's affine (sform/qform)")
    return "".join(codes)


def is_axis_codes(codes: object) -> bool:
    """Whether ``codes`` names a grid orientation: one of L/R, A/P, S/I per axis, e.g. ``"LSA"``."""
    return (isinstance(codes, str) and len(codes) == 3
            and all(sum(c in pair for c in codes) == 1 for pair in ("LR", "AP", "IS")))


def _to_ras(codes: str) -> np.ndarray:
    return ornt_transform(axcodes2ornt(tuple(codes)), axcodes2ornt(tuple(CANONICAL)))


def _apply(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply ``ornt`` to the last three axes of ``array`` (a channel axis may come first)."""
    moved = np.moveaxis(array, range(array.ndim - 3), range(3, array.ndim))
    return np.ascontiguousarray(np.moveaxis(apply_orientation(moved, ornt), range(3, array.ndim), range(array.ndim - 3)))


def to_canonical(array: np.ndarray, codes: str) -> np.ndarray:
    """``array`` (``(..., X, Y, Z)`` on a grid with axis ``codes``) in RAS voxel order."""
    return array if codes == CANONICAL else _apply(array, _to_ras(codes))


def from_canonical(array: np.ndarray, codes: str) -> np.ndarray:
    """Inverse of :func:`to_canonical`: a RAS-ordered ``(..., X, Y, Z)`` array back in ``codes`` order."""
    return array if codes == CANONICAL else _apply(array, ornt_transform(axcodes2ornt(tuple(CANONICAL)),
                                                                         axcodes2ornt(tuple(codes))))


def canonical_order(values: Sequence, codes: str) -> tuple:
    """Per-axis values (a shape, a spacing) of a ``codes`` grid, listed in RAS axis order."""
    out = list(values)
    for axis, (target, _) in enumerate(_to_ras(codes)):
        out[int(target)] = values[axis]
    return tuple(out)
