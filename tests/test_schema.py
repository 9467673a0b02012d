"""One validation mechanism for every mapping: keys named with the closest known one, types converted (numeric
strings only from YAML), nested sections prefixed, value rules keyed; choices (`Literal`) and bounds (`Range`)
declared on the fields, refused with the key (a choice with the closest one); library errors name the value and
the CLI writes the value's flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, get_args

import pytest

from lorasum import schema
from lorasum.errors import LorasumError
from lorasum.lm.choices import LossOn
from lorasum.lm.data import check_max_length
from lorasum.lm.train import TrainConfig
from lorasum.study.config import ExperimentConfig, TuneSettings
from lorasum.tune.space import DEFAULT_SPACE


@dataclass
class Inner:
    rate: float = 0.1
    steps: int = 1

    def check(self) -> None:
        if self.steps < 1:
            raise LorasumError(f"must be at least 1, got {self.steps}", key="steps")


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    tags: list[str] | None = None


def test_types_are_converted_and_nested_sections_parsed():
    o = schema.parse(Outer, {"name": "x", "inner": {"rate": "1e-3", "steps": 2.0}, "tags": ["a"]}, "f.yaml")
    assert o == Outer("x", Inner(1e-3, 2), ["a"]) and isinstance(o.inner.steps, int)
    assert schema.parse(Inner, {"rate": 64}).rate == 64 and isinstance(schema.parse(Inner, {"rate": 64}).rate, int)


@pytest.mark.parametrize("d, message", [
    ({"name": "x", "innr": {}}, "f.yaml: unknown config key 'innr'; did you mean 'inner'?"),
    ({"name": "x", "inner": {"rte": 1}}, "f.yaml: unknown config key 'inner.rte'; did you mean 'inner.rate'?"),
    ({"name": "x", "inner": {"rate": "fast"}}, "f.yaml: 'inner.rate' must be a number, got 'fast'"),
    ({"name": "x", "inner": {"steps": 0}}, "f.yaml: 'inner.steps' must be at least 1, got 0"),
    ({"name": "x", "tags": "a"}, "f.yaml: 'tags' must be a list of strings or null, got 'a'"),
    ({"name": 3}, "f.yaml: 'name' must be a string, got 3"),
    ({}, "f.yaml: 'name' is required"),
    ({"name": "x", "inner": {"steps": True}}, "f.yaml: 'inner.steps' must be an integer, got True"),
])
def test_errors_name_the_key(d, message):
    with pytest.raises(LorasumError) as e:
        schema.parse(Outer, d, "f.yaml")
    assert str(e.value) == message


def test_strict_sources_take_no_numeric_strings():
    assert schema.parse(Inner, {"rate": "0.5"}).rate == 0.5
    with pytest.raises(LorasumError, match="'rate' must be a number, got '0.5'"):
        schema.parse(Inner, {"rate": "0.5"}, "spec.json", strict=True)


def test_train_config_rules_are_keyed_and_shared():
    with pytest.raises(LorasumError) as e:
        TrainConfig.from_dict({"epochs": 0}, "run.yaml")
    assert str(e.value) == "run.yaml: 'epochs' must be at least 1 and at most 1000, got 0"
    with pytest.raises(LorasumError) as e:
        check_max_length(4)
    assert (str(e.value), e.value.as_flag()) == ("max_length 4 is too short; use at least 8 tokens",
                                                 "--max-length 4 is too short; use at least 8 tokens")


def test_the_cli_writes_the_flag_of_a_keyed_error(run_cli, tiny_data):
    rc, out, err, _ = run_cli("eval", "--model", "tiny-gpt2", "--data", "colors", "--data-dir", tiny_data,
                              "--max-length", "4")
    assert (rc, out, err) == (2, "", "lorasum: error: --max-length 4 is too short; use at least 8 tokens\n")
    rc, out, err, _ = run_cli("train", "--model", "tiny-gpt2", "--data", "colors", "--data-dir", tiny_data,
                              "--out", "x", "--epochs", "0")
    assert (rc, err) == (2, "lorasum: error: --epochs must be at least 1 and at most 1000, got 0\n")


# --- rules declared on the fields: Literal choices, Range bounds, Wording, Rule ---------------------------------
def _distinct(names: list[str]) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LorasumError(f"names {', '.join(dup)} more than once")


@dataclass
class Declared:
    mode: Literal["fast", "slow"] = "fast"
    speed: Literal["fast", "slow", "steady"] = "steady"
    count: Annotated[int, schema.Range(1, 10)] = 1
    share: Annotated[float, schema.Range(0, 1, high_open=True)] = 0.5
    cap: Annotated[int | None, schema.Range(1), schema.Wording("at least 1 (or null for all)")] = None
    digits: list[Annotated[int, schema.Range(0, 9)]] = field(default_factory=list)
    names: Annotated[list[str], schema.Rule(_distinct)] = field(default_factory=list)


@dataclass
class Holder:
    declared: Declared = field(default_factory=Declared)


@pytest.mark.parametrize("d, message", [
    ({"mode": "fats"}, "f.yaml: 'mode' must be 'fast' or 'slow', got 'fats'; did you mean 'fast'?"),
    ({"mode": "zzz"}, "f.yaml: 'mode' must be 'fast' or 'slow', got 'zzz'"),
    ({"speed": "stedy"}, "f.yaml: 'speed' must be one of fast, slow, steady, got 'stedy'; did you mean 'steady'?"),
    ({"mode": 3}, "f.yaml: 'mode' must be a string, got 3"),
    ({"count": 11}, "f.yaml: 'count' must be at least 1 and at most 10, got 11"),
    ({"count": 0}, "f.yaml: 'count' must be at least 1 and at most 10, got 0"),
    ({"count": 10**30}, "f.yaml: 'count' must be at least 1 and at most 10, got 100000000000... (31 digits)"),
    ({"count": 2.5}, "f.yaml: 'count' must be an integer, got 2.5"),
    ({"share": 1}, "f.yaml: 'share' must be in [0, 1), got 1"),
    ({"share": -0.5}, "f.yaml: 'share' must be in [0, 1), got -0.5"),
    ({"cap": 0}, "f.yaml: 'cap' must be at least 1 (or null for all), got 0"),
    ({"digits": [1, 10]}, "f.yaml: 'digits' must be at least 0 and at most 9, got 10"),
    ({"names": ["a", "b", "a"]}, "f.yaml: 'names' names a more than once"),
])
def test_declared_rules_refuse_with_the_key(d, message):
    with pytest.raises(LorasumError) as e:
        schema.parse(Declared, d, "f.yaml")
    assert str(e.value) == message


def test_declared_rules_of_a_nested_section_name_its_dotted_key():
    with pytest.raises(LorasumError) as e:
        schema.parse(Holder, {"declared": {"count": 11}}, "f.yaml")
    assert str(e.value) == "f.yaml: 'declared.count' must be at least 1 and at most 10, got 11"
    with pytest.raises(LorasumError) as e:
        schema.parse(Holder, {"declared": {"speed": "slw"}}, "f.yaml")
    assert str(e.value) == "f.yaml: 'declared.speed' must be one of fast, slow, steady, got 'slw'; did you mean 'slow'?"


def test_values_at_the_bounds_are_accepted():
    d = schema.parse(Declared, {"mode": "slow", "count": 10, "share": 0.0, "cap": 1, "digits": [0, 9],
                                "names": ["a", "b"]})
    assert d == Declared("slow", "steady", 10, 0.0, 1, [0, 9], ["a", "b"])
    assert schema.parse(Declared, {"count": 1, "cap": None}).count == 1
    assert schema.parse(Declared, {"count": "1e1"}).count == 10  # YAML's numeric string, then the bound


def test_rules_hold_for_a_config_built_in_code_and_for_flags():
    with pytest.raises(LorasumError) as e:
        schema.check_fields(Declared(share=float("inf")))
    assert (e.value.key, e.value.message) == ("share", "must be in [0, 1), got inf")
    schema.check_fields(Declared(count=10))
    with pytest.raises(LorasumError) as e:
        schema.require(Annotated[int, schema.Range(1, 10)], True, "count")
    assert str(e.value) == "count must be at least 1 and at most 10, got True"
    with pytest.raises(LorasumError) as e:
        schema.check_count(4097, "r", 4096)
    assert e.value.as_flag() == "--r must be at least 1 and at most 4096, got 4097"
    assert schema.check_count(4096, "r", 4096) == 4096


@pytest.mark.parametrize("bounds, words", [
    (schema.Range(1, 4096), "at least 1 and at most 4096"),
    (schema.Range(1), "at least 1"),
    (schema.Range(0, low_open=True), "> 0"),
    (schema.Range(0, 1, high_open=True), "in [0, 1)"),
    (schema.Range(0, 1, low_open=True, high_open=True), "in (0, 1)"),
    (schema.Range(0.5, 2.0, low_open=True), "in (0.5, 2]"),
])
def test_range_words(bounds, words):
    assert bounds.words() == words


def test_a_choice_is_declared_once():
    """The values are read from the declared type; a field of that type refuses any other."""
    assert get_args(LossOn) == ("all", "answer")
    with pytest.raises(LorasumError) as e:
        TrainConfig.from_dict({"loss_on": "answers"}, "p.json", strict=True)
    assert str(e.value) == "p.json: 'loss_on' must be 'all' or 'answer', got 'answers'; did you mean 'answer'?"


# --- the tune section: one type after parsing, the YAML shorthands normalised -----------------------------------
@pytest.mark.parametrize("tune, mode", [(None, None), (False, None), (True, "shared"), ({}, "shared"),
                                        ("per_partition", "per_partition"),
                                        ({"mode": "per_partition", "trials": 2}, "per_partition")])
def test_tune_is_settings_or_none_after_parsing(tune, mode):
    cfg = ExperimentConfig.from_dict({"domains": ["a", "b"], "tune": tune})
    if mode is None:
        assert cfg.tune is None and cfg.to_dict()["tune"] is None
    else:
        assert isinstance(cfg.tune, TuneSettings) and cfg.tune.mode == mode
        assert list(cfg.to_dict()["tune"]) == ["mode", "trials", "space", "seed", "storage", "heartbeat"]
        assert cfg.to_dict()["tune"]["space"] == DEFAULT_SPACE


@pytest.mark.parametrize("tune, message", [
    (5, "config: 'tune' must be a mapping or a string or true or false or null, got 5"),
    ("shraed", "config: 'tune.mode' must be one of shared, per_partition, got 'shraed'; did you mean 'shared'?"),
    ({"trials": 0}, "config: 'tune.trials' must be an integer of at least 1, got 0"),
    ({"heartbeat": 86_401}, "config: 'tune.heartbeat' must be a whole number of seconds in [1, 86400], got 86401"),
    ({"storage": "db"},
     "config: 'tune.storage' must be an SQLAlchemy URL (e.g. postgresql://host/db) or null, got 'db'"),
])
def test_tune_refusals_keep_their_words(tune, message):
    with pytest.raises(LorasumError) as e:
        ExperimentConfig.from_dict({"domains": ["a", "b"], "tune": tune})
    assert str(e.value) == message
