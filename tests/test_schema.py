"""One validation mechanism for every mapping: keys named with the closest known one, types converted (numeric
strings only from YAML), nested sections prefixed, value rules keyed; library errors name the value and the CLI
writes the value's flag."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lorasum import schema
from lorasum.errors import LorasumError
from lorasum.lm.data import check_max_length
from lorasum.lm.train import TrainConfig


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
