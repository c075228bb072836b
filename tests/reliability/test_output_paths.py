"""Every verb's output path as a folder, a symbolic link and a FIFO (and a file where a folder goes).

File outputs (``evaluate -o``, ``export -o``, ``benchmark --output``) must be absent or regular
files: a folder, a link or a FIFO there is refused before any work, and a link's target is never
written. Folder outputs may be a folder or a link to one; a FIFO, a file or a dangling link is
refused before any work.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .conftest import TINY_TRAIN
from .helpers import cli


def _msd_task(root: Path) -> Path:
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"name": "Empty", "modality": {"0": "MRI"},
                                                   "labels": {"0": "background", "1": "a"}, "training": [], "test": []}))
    return root


FILE_VERBS = {
    "evaluate": lambda base, tmp, out: ("evaluate", base["raw"] / "labelsTr", shutil.copytree(base["raw"] / "labelsTr", tmp / "pred"),
                                        "-o", out),
    "export": lambda base, tmp, out: ("export", base["run"], "-o", out),
    "benchmark": lambda base, tmp, out: ("benchmark", "--models", "lunet", "--size", "16", "--warmup", "0", "--repeats", "1",
                                         "--output", out),
}
FOLDER_VERBS = {
    "demo": lambda base, tmp, out: ("demo", "--out", out),
    "demo-data": lambda base, tmp, out: ("demo-data", out, "--cases", "1"),
    "convert-msd": lambda base, tmp, out: ("convert-msd", _msd_task(tmp / "Task01_Empty"), out),
    "preprocess": lambda base, tmp, out: ("preprocess", base["raw"], "-o", out, "--workers", "1"),
    "train": lambda base, tmp, out: ("train", base["cache"], "-o", out, *TINY_TRAIN),
    "predict": lambda base, tmp, out: ("predict", "-i", base["images"], "-o", out, "-m", base["run"], "--device", "cpu"),
    "crossval": lambda base, tmp, out: ("crossval", base["raw"] / "labelsTr", base["run"], "-o", out, "--workers", "1"),
    "find-best": lambda base, tmp, out: ("find-best", base["raw"] / "labelsTr", "-m", "a", base["run"], "-o", out,
                                         "--workers", "1"),
}
SUFFIX = {"evaluate": "summary.json", "export": "model.onnx", "benchmark": "rows.json"}


def test_every_verb_that_writes_is_swept():
    """A verb with an output option must join FILE_VERBS or FOLDER_VERBS (crossval and find-best
    had been left out, and wrote through links)."""
    import argparse

    from lightseg.cli import build_parser

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    writers = {verb for verb, sub in verbs.choices.items() if {a.dest for a in sub._actions} & {"out", "output"}}
    assert writers == set(FILE_VERBS) | set(FOLDER_VERBS)


def _make(kind: str, path: Path, tmp: Path) -> Path | None:
    """Put ``kind`` at ``path``; returns a file whose content must survive (a link's target)."""
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "file":
        path.write_text("the user's")
        return path
    elif kind == "dangling-link":
        path.symlink_to(tmp / "nowhere")
    elif kind == "link-to-file":
        (tmp / "target").write_text("the user's")
        path.symlink_to(tmp / "target")
        return tmp / "target"
    return None


FILE_CASES = [(verb, kind, words) for verb in FILE_VERBS for kind, words in
              [("folder", "is a folder"), ("fifo", "is a FIFO"), ("link-to-file", "is a symbolic link"),
               ("dangling-link", "is a symbolic link")]]


@pytest.mark.parametrize("verb,kind,words", FILE_CASES, ids=[f"{v}-{k}" for v, k, _ in FILE_CASES])
def test_a_file_output_that_is_not_a_regular_file(base, tmp_path, verb, kind, words):
    out = tmp_path / SUFFIX[verb]
    keep = _make(kind, out, tmp_path)
    code, err = cli(*FILE_VERBS[verb](base, tmp_path, out))
    assert code == 1 and f"{out}: {words}" in err and "Traceback" not in err, err
    assert keep is None or keep.read_text() == "the user's"
    assert not (tmp_path / "nowhere").exists()


FOLDER_CASES = [(verb, kind, words) for verb in FOLDER_VERBS for kind, words in
                [("fifo", "is a FIFO"), ("file", "is a regular file, not a folder"),
                 ("dangling-link", "is a symbolic link to nothing"), ("link-to-file", "is a regular file, not a folder")]]


@pytest.mark.parametrize("verb,kind,words", FOLDER_CASES, ids=[f"{v}-{k}" for v, k, _ in FOLDER_CASES])
def test_a_folder_output_that_is_not_a_folder(base, tmp_path, verb, kind, words):
    out = tmp_path / "out"
    keep = _make(kind, out, tmp_path)
    code, err = cli(*FOLDER_VERBS[verb](base, tmp_path, out))
    assert code == 1 and f"{out}: {words}" in err and "Traceback" not in err, err
    assert keep is None or keep.read_text() == "the user's"
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("verb", ["convert-msd", "preprocess", "predict", "train", "crossval", "find-best"])
def test_a_folder_output_may_be_a_link_to_a_folder(base, tmp_path, verb):
    (tmp_path / "real").mkdir()
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "real")
    code, err = cli(*FOLDER_VERBS[verb](base, tmp_path, out))
    assert code == 0, err
    assert any((tmp_path / "real").iterdir()) and out.is_symlink()
