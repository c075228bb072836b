"""Shared helpers of the reliability suite: NIfTI files with any header, the CLI in process, and a
check that every file a stage left behind is complete and valid."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from lightseg.cli import main


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save ``data`` with ``affine`` as its sform, even a degenerate one (zero spacing) that nibabel
    cannot store as a qform."""
    image = nib.Nifti1Image(data, np.eye(4))
    image.set_qform(None, code=0)
    image.set_sform(np.asarray(affine, dtype=np.float64), code=1)
    zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    image.header.set_zooms(tuple(float(z) for z in zooms) + (1.0,) * (data.ndim - 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def cli(*argv: object) -> tuple[int, str]:
    """``lightseg ARGV`` in this process: (exit status, stderr then stdout). An uncaught exception
    (a traceback) fails the test."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, err.getvalue() + out.getvalue()


def assert_files_valid(folder: Path) -> int:
    """Every visible file under ``folder`` opens completely; returns how many were checked.

    Hidden ``.*.tmp`` files are an atomic writer's temp files: never read by any stage and removed
    on the next run, so they are not outputs.
    """
    from lightseg.run_folder import load_checkpoint

    count = 0
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        name = path.name
        if name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".npy"):
            np.asarray(np.load(path, allow_pickle=False))
        elif name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                for key in npz.files:
                    np.asarray(npz[key])
        elif name.endswith(".nii.gz"):
            np.asarray(nib.load(path).dataobj)
        elif name.endswith(".pth"):
            load_checkpoint(path)
        elif name.endswith(".png"):
            data = path.read_bytes()
            assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), path
        count += 1
    return count


def temp_files(folder: Path) -> list[Path]:
    """Temp files with content left in ``folder``. An empty one younger than ``TEMP_GRACE_S`` may
    stay (its writer may be between creating and locking it); the next run removes it."""
    return sorted(p for p in Path(folder).rglob(".*.tmp") if p.stat().st_size)


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in Path(folder).rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
