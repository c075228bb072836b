"""Messages that name the real cause: a file that is not NIfTI, one cut short, RGB or complex
voxels, too little memory, and write errors naming the target instead of a temp file.

Complex voxels were cut to their real part without a word; RGB, non-NIfTI and memory errors
were all called "corrupt or truncated".
"""

from __future__ import annotations

import errno
import gzip
import re
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lightseg.errors import ImageError
from lightseg.io import load_nifti, write_json

from .helpers import cli, write_nifti


def _valid(path: Path) -> Path:
    return write_nifti(path, np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8), np.eye(4))


def _rgb(path: Path) -> Path:
    data = np.zeros((6, 7, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _complex(path: Path) -> Path:
    nib.save(nib.Nifti1Image((np.ones((6, 7, 8)) * (1 + 2j)).astype(np.complex64), np.eye(4)), path)
    return path


def _cut(path: Path, keep: float) -> Path:
    data = _valid(path).read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _cut_raw(path: Path) -> Path:
    """An uncompressed .nii whose voxel data ends early (the header is whole)."""
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:1000])
    return path


FILES = [
    ("truncated-gzip", lambda p: _cut(p, 0.5), "corrupt or truncated"),
    ("truncated-data", lambda p: _cut_raw(p.with_name("scan.nii")), "corrupt or truncated"),
    ("text", lambda p: (p.write_text("patient name, dose\n" * 40), p)[1], "not a NIfTI file"),
    ("gzipped-text", lambda p: (p.write_bytes(gzip.compress(b"x" * 600)), p)[1], "not a NIfTI file"),
    ("empty", lambda p: (p.write_bytes(b""), p)[1], "not a NIfTI file (an empty file"),
    ("rgb", _rgb, "an RGB (colour) image"),
    ("complex", _complex, "complex-valued voxels"),
]


@pytest.mark.parametrize("make,words", [f[1:] for f in FILES], ids=[f[0] for f in FILES])
def test_each_unreadable_file_is_named_with_its_cause(tmp_path, make, words):
    path = make(tmp_path / "scan.nii.gz")
    with pytest.raises(ImageError, match=re.escape(words)) as info:
        load_nifti(path)
    assert str(info.value).startswith(f"{path}: ")
    code, err = cli("info", path)  # the same words through a verb
    assert code == 1 and words in err and "Traceback" not in err, err


def test_a_complex_image_is_refused_not_cut_to_its_real_part(raw_copy, tmp_path):
    for channel in (0, 1):
        path = raw_copy / "imagesTr" / f"case_tr001_{channel:04d}.nii.gz"
        old = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(old.dataobj).astype(np.complex64) * (1 + 1j), old.affine), path)
    code, err = cli("preprocess", raw_copy, "-o", tmp_path / "cache", "--workers", "1")
    assert code == 1 and "complex-valued voxels" in err and "case_tr001_0000" in err, err
    code, out = cli("verify", raw_copy, "--workers", "1")
    assert code == 1 and "complex-valued voxels" in out, out


def test_out_of_memory_is_called_out_of_memory(tmp_path, monkeypatch):
    path = _valid(tmp_path / "scan.nii.gz")

    def no_memory(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", no_memory)
    with pytest.raises(ImageError, match=r"out of memory while reading it \(shape \(6, 7, 8\)"):
        load_nifti(path)


def test_a_write_error_names_the_target_not_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"

    def full(dir, prefix, suffix):  # noqa: A002 - tempfile's own parameter name
        raise OSError(errno.ENOSPC, "No space left on device", f"{dir}/{prefix}abcd1234{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(OSError) as info:
        write_json(target, {"a": 1})
    assert info.value.filename == str(target) and info.value.errno == errno.ENOSPC


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: not enough memory: you tried to "
                                                                  "allocate 4398046511104 bytes.")])
def test_out_of_memory_in_a_verb_is_one_line_with_advice(base, tmp_path, monkeypatch, error):
    import lightseg.training.run

    def train(*args, **kwargs):
        raise error

    monkeypatch.setattr(lightseg.training.run, "train", train)
    code, err = cli("train", base["cache"], "-o", tmp_path / "run", "--patch", "1024", "1024", "1024")
    assert code == 1 and "error: out of memory" in err and "smaller --patch" in err, err


def test_a_bug_keeps_its_traceback(base, tmp_path, monkeypatch):
    import lightseg.training.run

    def train(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(lightseg.training.run, "train", train)
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli("train", base["cache"], "-o", tmp_path / "run")


@pytest.mark.parametrize("error, words, not_words", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/case.nii.gz"), ["/out/case.nii.gz", "disk", "full"], []),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/out/x"), ["quota", "free space"], []),
    (OSError(errno.EACCES, "Permission denied", "/out"), ["/out", "writable folder", "permissions"], []),
    (OSError(errno.EROFS, "Read-only file system", "/out"), ["writable folder"], []),
    (OSError(errno.ENOTDIR, "Not a directory", "/a-file/out"), ["/a-file/out", "writable folder"], []),
    (OSError(errno.ENOENT, "No such file or directory", "/gone"), ["/gone", "check the path"], ["writable"]),
    (OSError(errno.EMFILE, "Too many open files"), ["ulimit -n", "fewer --workers"], ["writable", "disk"]),
    (OSError(errno.EIO, "Input/output error", "/data/x.nii.gz"), ["/data/x.nii.gz", "read/write error"], ["writable"]),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), ["Connection reset", "system error"],
     ["writable", "free space", "disk"]),
    (TimeoutError("timed out"), ["timed out", "system error"], ["writable", "free space"]),
])
def test_a_machine_error_gets_advice_that_fits_its_cause(capsys, error, words, not_words):
    """A dropped connection once got "make sure the path is a writable folder with free space"; each
    cause now gets its own advice, and path advice only where a path is the cause."""
    import argparse

    from lightseg.cli import _run

    def run(args):
        raise error

    assert _run(argparse.Namespace(verb="predict", run=run)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lightseg predict: error: ") and "Traceback" not in err, err
    assert all(word in err for word in words) and not any(word in err for word in not_words), err


def test_an_os_out_of_memory_error_gets_the_memory_advice(capsys):
    import argparse

    from lightseg.cli import _run

    def run(args):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    assert _run(argparse.Namespace(verb="train", run=run)) == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and "smaller --patch" in err and "writable" not in err, err
