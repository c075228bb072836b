"""Every numeric option of every verb, the plain text ones and the JSON-typed ones, checked where they are parsed.

The sweep introspects the parser, so an option added later is covered without editing this file:
each int or float option must refuse -1, NaN, +-Inf, 1e999 and a huge integer with one argparse
line naming it (exit 2), refuse 0 unless its bounds allow it, and accept its own default.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import typing

import pytest

from lightseg.cli import build_parser, main
from lightseg.cli_options import text as text_type

from .helpers import cli

BAD = ["-1", "nan", "inf", "-inf", "1e999", str(10**40), "abc"]


def _numeric_options() -> list[tuple[str, argparse.Action]]:
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for verb, sub in verbs.choices.items():
        for action in sub._actions:
            assert action.type not in (int, float), f"{verb} {action.option_strings}: an unchecked number"
            if hasattr(action.type, "bounds"):
                out.append((verb, action))
    return out


OPTIONS = _numeric_options()


def test_the_sweep_covers_every_verb_with_numbers():
    assert {verb for verb, _ in OPTIONS} >= {"demo", "demo-data", "convert-msd", "verify", "preprocess", "train",
                                              "predict", "evaluate", "export", "benchmark"}
    assert len(OPTIONS) >= 33


@pytest.mark.parametrize("verb,action", OPTIONS, ids=[f"{v}{a.option_strings[0]}" for v, a in OPTIONS])
def test_every_numeric_option_refuses_bad_values_where_it_is_parsed(verb, action):
    check = action.type
    low, low_ok, _, _ = check.bounds
    for text in BAD + ["0"]:
        if text == "0" and low_ok and low <= 0:
            assert check("0") == 0  # zero is a documented value of this option
            continue
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            check(text)
    default = action.default
    for value in default if isinstance(default, (list, tuple)) else [default]:
        if value is not None:
            assert check(str(value)) == value, f"{verb} {action.option_strings}: its default {value} is out of bounds"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main([verb, *_fill(verb), action.option_strings[0], *["nan"] * (action.nargs if isinstance(action.nargs, int) else 1)])
    assert info.value.code == 2 and f"argument {action.option_strings[0]}" in err.getvalue() and "Traceback" not in err.getvalue()


def _fill(verb: str) -> list[str]:
    """Positional arguments that satisfy the verb's parser (never used: the bad option stops it)."""
    return {"evaluate": ["a", "b"], "verify": ["a"], "convert-msd": ["a", "b"], "info": ["a"], "preprocess": ["a"],
            "train": ["a"], "export": ["a"], "demo-data": ["a"]}.get(verb, [])


@pytest.mark.parametrize("text", ["[1]", "1", '"width"', "null", "true"])
def test_model_kwargs_must_be_a_json_object(text, tmp_path):
    code, err = cli("train", tmp_path / "missing", "-o", tmp_path / "run", "--model-kwargs", text)
    assert code == 1 and "--model-kwargs must be a JSON object" in err, err


def test_architecture_must_be_a_json_object(tmp_path):
    (tmp_path / "architecture.json").write_text("[1, 2]")
    code, err = cli("train", tmp_path / "missing", "-o", tmp_path / "run", "--architecture", tmp_path / "architecture.json")
    assert code == 1 and "must be a JSON object of module names" in err, err


def test_benchmark_shapes_are_bounded():
    for text in ("0x64", "1x0", "1x99999"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
            main(["benchmark", "--extra", text])
        assert "argument --extra" in err.getvalue()


@pytest.mark.parametrize("kwargs", ['{"width": "x"}', '{"width": null}', '{"width": -1}', '{"depth_of_nothing": 1}'])
def test_model_kwargs_with_values_the_model_cannot_take(base, tmp_path, kwargs):
    code, err = cli("train", base["cache"], "-o", tmp_path / "run", "--model", "lunet", "--model-kwargs", kwargs)
    assert code == 1 and ("model 'lunet'" in err or "UNet3D needs" in err), err
    assert "Traceback" not in err


def _text_options() -> list[tuple[str, argparse.Action]]:
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(verb, action) for verb, sub in verbs.choices.items() for action in sub._actions
            if action.type is text_type]

TEXT_OPTIONS = _text_options()


def test_every_plain_text_option_is_checked():
    """No option takes a string unchecked: each has a type of its own, choices, or the non-empty check."""
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for verb, sub in verbs.choices.items():
        for action in sub._actions:
            assert action.nargs == 0 or action.type is not None or action.choices is not None, (verb, action.dest)
    assert len(TEXT_OPTIONS) >= 35


@pytest.mark.parametrize("verb,action", TEXT_OPTIONS,
                         ids=[f"{v}-{a.option_strings[0] if a.option_strings else a.dest}" for v, a in TEXT_OPTIONS])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_text_value_is_one_argparse_line(verb, action, value):
    """``-o ""`` (an unset shell variable) and the like: exit 2 naming the argument, no traceback."""
    fill = _fill(verb)
    if action.option_strings:
        argv = [verb, *fill, action.option_strings[0], value]
    else:  # a positional: the empty value in its place
        positionals = [a for a in TEXT_OPTIONS if a[0] == verb and not a[1].option_strings]
        argv = [verb, *[value if a.dest == action.dest else "x" for _, a in positionals]]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main(argv)
    message = err.getvalue()
    assert info.value.code == 2 and "must not be empty" in message and "Traceback" not in message, message


# ----- training options from the Python API, --config files and recipes ------------------------
def _training_numbers() -> list[str]:
    from lightseg.training.config import OPTIONS as TRAINING_OPTIONS, SECTIONS, _number_kind

    names = []
    for name, (section, key) in TRAINING_OPTIONS.items():
        if _number_kind(typing.get_type_hints(SECTIONS[section])[key])[0] is not None:
            names.append(name)
    return names


TRAINING_NUMBERS = _training_numbers()
MINIMAL = dict(model="unet", in_channels=1, num_classes=2, patch_size=(16, 16, 16), label_values=(0, 1))


def test_the_training_sweep_covers_the_numbers_the_cli_does_not_take():
    assert {"lr", "momentum", "weight_decay", "grad_clip", "pruning_deadline", "patch_size", "epochs"} <= set(TRAINING_NUMBERS)


@pytest.mark.parametrize("name", TRAINING_NUMBERS)
def test_every_numeric_training_option_refuses_bad_values_from_any_source(name):
    """The Python API, a --config file and a recipe all reach TrainConfig; each number is checked
    there against the CLI's own bounds table (a --config file with lr -1 was torch's traceback,
    train(epochs="3") a TypeError, train(patch_size=(32, 32)) advice to use (32, 32))."""
    from lightseg.bounds import bounds_of
    from lightseg.errors import ConfigError
    from lightseg.training.config import TrainConfig
    from lightseg.training.recipes import RECIPES

    TrainConfig.from_options(MINIMAL)  # the defaults pass
    for recipe in RECIPES.values():  # and every recipe's values
        TrainConfig.from_options({**MINIMAL, **{k: v for k, v in recipe.options.items() if k == name}})
    huge = [10**40] if bounds_of(name, int)[2] < 10**40 else []  # pruning_tolerance takes any finite value
    for value in (-1, float("nan"), float("inf"), *huge, "3", True, (1, 2)):
        bad = (value,) * 3 if name == "patch_size" and not isinstance(value, tuple) else value
        with pytest.raises(ConfigError, match=f"training option '{name}' must be"):
            TrainConfig.from_options({**MINIMAL, name: bad})


def test_a_config_file_with_a_bad_number_is_refused_before_anything_is_written(base, tmp_path):
    config = json.loads((base["run"] / "config.json").read_text())
    config["optim"]["lr"] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(config))
    code, err = cli("train", base["cache"], "-o", tmp_path / "run", "--config", tmp_path / "bad.json", "--device", "cpu")
    assert code == 1 and "training option 'lr' must be a finite number > 0" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "config.json").exists()
