"""Every JSON file lightseg reads, each key given a value of the wrong type, and each file cut short.

The files of a run folder (``config.json``, ``plan.json``, ``dataset.json``, ``architecture.json``)
go through ``predict``, the ONNX sidecar through ``predict --backend onnx``, the cache's
``cases.json`` through ``train`` and a cached case's ``{case}.json`` through its reader. Each
must give exit 1 (or the reader's error) naming the file and the key, never a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightseg.data.preprocess import load_case_properties
from lightseg.errors import PlanError

from .conftest import TINY_TRAIN
from .helpers import cli


def _wrong(value: object) -> object:
    """A value of another JSON type than ``value``'s."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "many"
    if isinstance(value, str):
        return 12345
    if isinstance(value, list):
        return "a text"
    if isinstance(value, dict):
        return [1, 2]
    return "a text"  # null: no key that may be null takes a string


def _keys(path: Path) -> list[str]:
    return list(json.loads(path.read_text()))


def _set(path: Path, key: str, value: object) -> None:
    """Set ``key``; ``section.key`` is a key of config.json's section object."""
    obj = json.loads(path.read_text())
    *section, name = key.split(".")
    (obj[section[0]] if section else obj)[name] = value
    path.write_text(json.dumps(obj))


def _get(path: Path, key: str) -> object:
    obj = json.loads(path.read_text())
    *section, name = key.split(".")
    return (obj[section[0]] if section else obj)[name]


def _cut(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


@pytest.fixture(scope="module")
def pruned_run(base, tmp_path_factory) -> Path:
    """The shared run with an architecture.json, as a pruned PSP-Seg run has (its content is only parsed)."""
    run = Path(shutil.copytree(base["run"], tmp_path_factory.mktemp("arch") / "run"))
    (run / "architecture.json").write_text(json.dumps({"stage0": [0, 1]}))
    return run


RUN_FILES = ["config.json", "plan.json", "dataset.json"]


def _run_keys(base_run: Path) -> list[tuple[str, str]]:
    """Every key of the run files; config.json's as ``section.key`` (each section is an object)."""
    config = json.loads((base_run / "config.json").read_text())
    keys = [("config.json", f"{section}.{key}") for section, fields in config.items() for key in fields]
    return keys + [(name, key) for name in RUN_FILES[1:] for key in _keys(base_run / name)]


def _predict(base: dict, run: Path, tmp_path: Path, *extra: object) -> tuple[int, str]:
    return cli("predict", "-i", base["images"], "-o", tmp_path / "out", "-m", run, "--device", "cpu", *extra)


def test_every_key_of_every_run_file_with_a_wrong_type(base, tmp_path):
    tried = 0
    for name, key in _run_keys(base["run"]):
        run = Path(shutil.copytree(base["run"], tmp_path / f"run{tried}"))
        _set(run / name, key, _wrong(_get(run / name, key)))
        code, err = _predict(base, run, tmp_path)
        assert code == 1 and name in err and f"'{key.split('.')[-1]}'" in err and "Traceback" not in err, (name, key, err)
        tried += 1
    assert tried >= 60  # config.json alone has 54 keys


@pytest.mark.parametrize("name", [*RUN_FILES, "architecture.json"])
def test_a_run_file_cut_short(base, pruned_run, tmp_path, name):
    run = Path(shutil.copytree(pruned_run, tmp_path / "run"))
    _cut(run / name)
    code, err = _predict(base, run, tmp_path)
    assert code == 1 and str(run / name) in err and "Traceback" not in err, err


@pytest.mark.parametrize("value", [[1, 2], {"stage0": "x"}, {"stage0": [0.5]}])
def test_an_architecture_of_the_wrong_type(base, pruned_run, tmp_path, value):
    run = Path(shutil.copytree(pruned_run, tmp_path / "run"))
    (run / "architecture.json").write_text(json.dumps(value))
    code, err = _predict(base, run, tmp_path)
    assert code == 1 and "architecture" in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    code, err = cli("export", base["run"], "-o", out)
    assert code == 0, err
    return out


def test_every_key_of_the_onnx_sidecar_with_a_wrong_type_and_cut_short(base, exported, tmp_path):
    sidecar = Path(f"{exported}.json")
    keys = _keys(sidecar)
    for index, key in enumerate([*keys, None]):
        folder = tmp_path / f"m{index}"
        folder.mkdir()
        model = Path(shutil.copy(exported, folder / "model.onnx"))
        copy = Path(shutil.copy(sidecar, folder / "model.onnx.json"))
        if key is None:
            _cut(copy)
        else:
            _set(copy, key, _wrong(json.loads(copy.read_text())[key]))
        code, err = cli("predict", "-i", base["images"], "-o", folder / "out", "-m", model)
        assert code == 1 and str(copy) in err and "Traceback" not in err, (key, err)
        assert key is None or key in err, (key, err)
    assert len(keys) >= 17


@pytest.mark.parametrize("text", ['{"cases": "case_tr000"}', '{"cases": [1, 2]}', "[1]", '{"cases": ["case_tr000"'])
def test_the_cache_case_list_of_the_wrong_type_or_cut_short(base, tmp_path, text):
    cache = Path(shutil.copytree(base["cache"], tmp_path / "cache"))
    (cache / "cases.json").write_text(text)
    code, err = cli("train", cache, "-o", tmp_path / "run", *TINY_TRAIN)
    assert code == 1 and str(cache / "cases.json") in err and "Traceback" not in err, err


def test_every_key_of_a_cached_case_with_a_wrong_type_and_cut_short(base, tmp_path):
    cache = Path(shutil.copytree(base["cache"], tmp_path / "cache"))
    path = cache / "cases" / "case_tr000.json"
    original = path.read_text()
    keys = [k for k in json.loads(original) if k not in ("plan_key", "sources")]
    for key in [*keys, None]:
        path.write_text(original)
        if key is None:
            _cut(path)
        else:
            _set(path, key, _wrong(json.loads(original)[key]))
        with pytest.raises(PlanError) as info:
            load_case_properties(cache, "case_tr000")
        assert str(path) in str(info.value) and (key is None or f"'{key}'" in str(info.value))
    assert len(keys) >= 9
