"""``lightseg verify`` refuses first, in the same words, whatever a later stage refuses.

Each broken data set goes through ``verify`` (exit 1, listing the problem) and ``preprocess``
(exit 1, one line); the reason must read the same in both.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .helpers import cli, write_nifti

IMAGE = "imagesTr/case_tr001_0000.nii.gz"
IMAGE_1 = "imagesTr/case_tr001_0001.nii.gz"
LABEL = "labelsTr/case_tr001.nii.gz"


def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    old = nib.load(path)
    write_nifti(path, np.asarray(old.dataobj) if data is None else data, old.affine if affine is None else affine)


def _declare(root: Path, labels: dict) -> None:
    obj = json.loads((root / "dataset.json").read_text())
    obj["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(obj))


CASES = [
    ("zero-spacing", lambda r: [_rewrite(r / p, affine=np.diag([0.0, 1.0, 1.0, 1.0])) for p in (IMAGE, IMAGE_1, LABEL)],
     "is not positive and finite"),
    ("empty-image", lambda r: [_rewrite(r / p, np.zeros((0, 12, 12), np.float32)) for p in (IMAGE, IMAGE_1, LABEL)],
     "has no voxels"),
    ("nan-voxels", lambda r: _rewrite(r / IMAGE, np.full((12, 12, 12), np.nan, np.float32)), "NaN or Inf voxels"),
    ("label-above-255", lambda r: _declare(r, {"background": 0, "a": 1, "b": 300}), "must be an integer 0..255"),
    ("complex", lambda r: nib.save(nib.Nifti1Image(np.ones((12, 12, 12), np.complex64), np.eye(4)), r / IMAGE),
     "complex-valued voxels"),
    ("duplicate-labels", lambda r: _declare(r, {"background": 0, "a": 1, "b": 1, "c": 2}), "have the same value 1"),
]


@pytest.mark.parametrize("mutate,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_verify_refuses_what_preprocess_refuses_in_the_same_words(raw_copy, tmp_path, mutate, words):
    mutate(raw_copy)
    code, err = cli("preprocess", raw_copy, "-o", tmp_path / "cache", "--workers", "1")
    assert code == 1 and words in err and "Traceback" not in err, err
    code, out = cli("verify", raw_copy, "--workers", "1")
    assert code == 1 and words in out, out
