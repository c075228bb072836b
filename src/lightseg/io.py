"""File I/O shared by every stage: atomic writes and NIfTI reading with clear errors.

Every file lightseg writes goes through :func:`atomic_write` (temp file in the same folder, then
``os.replace``), so a kill or a full disk leaves either the complete old file, the complete new
file, or nothing, never half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np

from lightseg.errors import ImageError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
TEMP_GRACE_S = 2.0  # a temp file this young may be between its creation and its writer's lock
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: marks the temp file as in use
            yield handle
            handle.flush()
            os.fsync(fd)
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
            os.replace(tmp, path)  # still locked, so remove_stale_temps never takes it
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a full disk: say which file could not be written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def remove_stale_temps(folder: str | os.PathLike) -> None:
    """Delete the temp files of writers that died mid-write (a kill), never a live writer's.

    A live :func:`atomic_write` holds an exclusive lock on its temp file; the kernel drops it when
    the process dies. The lock is taken just after the file is created, before anything is
    written, so an empty temp file younger than ``TEMP_GRACE_S`` is kept too. Two processes may
    thus share a folder (two ``predict`` runs, two trainings preprocessing one cache) without one
    deleting the other's file in flight.
    """
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError), open(tmp, "rb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a writer holds it
            stat = os.fstat(handle.fileno())
            if stat.st_size or time.time() - stat.st_mtime > TEMP_GRACE_S:
                os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False)
        handle.write("\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save an array as ``.npy`` (no pickles, memory-mappable), atomically."""
    with atomic_write(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def strip_nifti_suffix(name: str) -> str:
    """``case_0000.nii.gz`` -> ``case_0000``."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a NIfTI header and check that its data can be read; raise :class:`ImageError` if not.

    The voxel data is read once here (nibabel reads lazily), so a truncated gzip stream is found
    now and named, instead of failing later deep inside preprocessing.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
        image.get_fdata(dtype=np.float32, caching="fill")
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ImageError(
            f"{path}: cannot read this NIfTI file ({type(exc).__name__}: {exc}); "
            "it is corrupt or truncated, re-export or re-copy it"
        ) from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageError(f"{path}: not a NIfTI image (nibabel read it as {type(image).__name__})")
    return image


def voxel_spacing(image: nib.Nifti1Image) -> tuple[float, ...]:
    """Spacing in mm along each voxel axis, from the affine (robust to a stale pixdim)."""
    affine = np.asarray(image.affine, dtype=np.float64)
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def save_nifti(path: str | os.PathLike, data: np.ndarray, reference: nib.Nifti1Image) -> None:
    """Write ``data`` on exactly ``reference``'s grid (affine, qform and sform codes), atomically."""
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    out = nib.Nifti1Image(data, reference.affine, header)
    out.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
    out.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
    payload = out.to_bytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1, mtime=0)  # level 1: 5x faster, ~same size on masks
    with atomic_write(path, "wb") as handle:
        handle.write(payload)
