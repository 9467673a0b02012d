"""A merge method's parameters are declared once, in its registry row (delta.registry): validation, the command-line
flags and their help, and the experiment's default grid all read that declaration; every command maps to a
handler named `*_command`."""

from __future__ import annotations

import argparse
from functools import partial

import pytest

from lorasum.cli.algebra import method_choice
from lorasum.cli.main import COMMANDS, build_parser
from lorasum.delta import registry
from lorasum.delta.methods import kernel
from lorasum.delta.registry import Method, Param, method_params, needs_model
from lorasum.errors import LorasumError
from lorasum.study import grid

SHARPNESS = Param("sharpness", float, 0.3, 0, 2, low_open=True, metavar="K", grid=(0.3, 1.5),
                  help="how sharp the dummy merge is", hint="e.g. --sharpness 0.3")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_a_parameter_declared_once_reaches_validation_flags_and_grid(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "dummy", Method("sum_", params=(SHARPNESS,)))

    # validation: the declared default, a given value, the range error worded from the declaration
    assert method_params("dummy", {}) == {"sharpness": 0.3}
    assert method_params("dummy", {"sharpness": 2}) == {"sharpness": 2}
    with pytest.raises(LorasumError, match=r"^sharpness must be in \(0, 2\], got 0; e.g. --sharpness 0.3$"):
        method_params("dummy", {"sharpness": 0})
    with pytest.raises(LorasumError, match=r"is not a hyperparameter of method 'ties' \(it takes --density\)"):
        method_params("ties", {"sharpness": 1.0})

    # the flag and its help, and the flag's text read as the declared type
    parser = build_parser()
    text = " ".join(_subparser(parser, "compose").format_help().split())
    assert "--sharpness K how sharp the dummy merge is (dummy; default 0.3)" in text
    assert "--sharpness" in _subparser(parser, "merge").format_help()
    args = parser.parse_args(["compose", "a", "--method", "dummy", "--sharpness", "1.5", "--out", "x"])
    assert method_choice(args) == ("dummy", {"sharpness": 1.5})
    args = parser.parse_args(["compose", "a", "--method", "dummy", "--sharpness", "sharp", "--out", "x"])
    with pytest.raises(LorasumError, match="^sharpness must be a number, got 'sharp'$"):
        method_choice(args)

    # the experiment's default grid: one model per declared point
    assert grid.default_grid("dummy") == {"sharpness": [0.3, 1.5]}
    monkeypatch.setitem(grid.COMPOSITIONS, "dummy", grid.Composition("dummy", per_subset=partial(grid._method, "dummy"),
                                                                      method=True))
    models = grid.model_catalog(["a", "b"], 2, ["dummy"]).of("dummy")
    assert [m.params for m in models] == [(("sharpness", 0.3),), (("sharpness", 1.5),)]


def test_the_default_grid_is_the_declared_points():
    declared = {m: grid.default_grid(m) for m in registry.METHODS if grid.default_grid(m)}
    assert declared == {"task_arithmetic": {"lam": [0.5, 1.0]}, "ties": {"density": [0.1, 0.2, 0.5]},
                        "dare_linear": {"density": [0.1, 0.2, 0.5]}, "dare_ties": {"density": [0.1, 0.2, 0.5]},
                        "magnitude_prune": {"density": [0.1, 0.2, 0.5]},
                        "breadcrumbs": {"density": [0.1, 0.2, 0.5], "gamma": [0.01]}}
    assert grid.default_grid("sum") is None and grid.default_grid("weight_search") is None


def test_every_row_names_its_function_and_peft_rows_need_a_model():
    from lorasum.lm.peft_merge import peft_method

    assert all(callable(kernel(name)) for name in registry.METHODS)
    assert all(callable(peft_method(name)) for name in registry.PEFT_METHODS)
    assert [m for m in registry.all_methods() if needs_model(m)] == ["peft_linear", "peft_ties"]
    assert [m for m, row in registry.METHODS.items() if row.random] == ["dare_linear", "dare_ties"]


def test_every_command_maps_to_a_command_handler():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    names = set()
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        names |= {f"{name} {n}" for n in nested[0].choices} if nested else {name}
    assert names == set(COMMANDS)
    assert all(f.__name__.endswith("_command") for f in COMMANDS.values())
