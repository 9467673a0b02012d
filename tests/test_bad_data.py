"""Data records an attacker might write: each is refused in one line naming the file, line and field (exit 2,
nothing written), or, for empty questions and answers, left out with the count shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import color_rows, one_line_error, write_jsonl

from lorasum.errors import LorasumError
from lorasum.lm.data import DataConfig, load_domain, require_nonempty


def stats_cli(run_cli, data_dir: Path, *domains: str, json_out: bool = False):
    return run_cli("data", "stats", *domains, "--model", "tiny-gpt2", "--data-dir", data_dir, "--max-length", 64,
                   *(["--json"] if json_out else []))


def with_line(tmp_path: Path, line: str, name: str = "d") -> Path:
    """d.jsonl: 20 good records, then `line` (line 21)."""
    write_jsonl(tmp_path / f"{name}.jsonl", [*color_rows(20), line])
    return tmp_path / f"{name}.jsonl"


def test_a_deeply_nested_jsonl_line_is_refused_naming_file_and_line(tmp_path, run_cli):
    path = with_line(tmp_path, '{"question": "q", "answer": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    before = sorted(tmp_path.iterdir())
    one_line_error(stats_cli(run_cli, tmp_path, "d"), f"{path}:21", "nested too deeply")
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("field", ["question", "answer"])
def test_a_lone_surrogate_is_refused_at_read_time_naming_file_line_and_field(field, tmp_path, run_cli):
    record = {"question": "what?", "answer": "this"}
    record[field] = "bad \ud800 text"
    path = with_line(tmp_path, json.dumps(record))  # json.dumps writes the lone surrogate as the escape \ud800
    assert "\\ud800" in path.read_text()
    one_line_error(stats_cli(run_cli, tmp_path, "d"), f"{path}:21", f"field '{field}'", "lone UTF-16 surrogate",
                   "\\ud800")


def test_a_valid_surrogate_pair_is_text(tmp_path):
    with_line(tmp_path, json.dumps({"question": "emoji \U0001F600?", "answer": "yes"}))
    dom = load_domain(str(tmp_path / "d.jsonl"))
    assert any("\U0001F600" in r.question for s in dom.records.values() for r in s)


def test_empty_questions_and_answers_are_left_out_and_counted(tmp_path, run_cli):
    empties = [{"question": "", "answer": f"a{i}"} for i in range(10)] + \
              [{"question": f"q{i}", "answer": "  \n"} for i in range(10)]
    write_jsonl(tmp_path / "d.jsonl", [*color_rows(40), *empties])
    dom = load_domain("d", DataConfig(data_dir=str(tmp_path)))
    assert sum(dom.skipped_empty.values()) == 20
    assert sum(dom.sizes().values()) == 40
    assert all(r.question.strip() and r.answer.strip() for s in dom.records.values() for r in s)
    assert dom.fingerprint()["skipped_empty"] == dom.skipped_empty

    rc, out, err, _ = stats_cli(run_cli, tmp_path, "d", json_out=True)
    assert rc == 0, err
    rows = json.loads(out)
    assert {r["split"]: r["skipped_empty"] for r in rows} == dom.skipped_empty
    assert {r["split"]: r["records"] for r in rows} == dom.sizes()
    rc, out, err, _ = stats_cli(run_cli, tmp_path, "d")  # the table shows the count too
    table = {line.split()[1]: line.split()[3] for line in out.splitlines()[1:] if line.startswith("d ")}
    assert rc == 0 and out.splitlines()[0].split()[:5] == ["domain", "split", "records", "left", "out"]
    assert {k: int(v) for k, v in table.items()} == dom.skipped_empty


def test_the_adapters_data_record_counts_the_records_left_out(tmp_path):
    from lorasum.lm.models import load_model
    from lorasum.lm.train import TrainConfig, train_adapter

    write_jsonl(tmp_path / "d.jsonl", [*color_rows(40), *({"question": "", "answer": f"a{i}"} for i in range(6))])
    data = DataConfig(data_dir=str(tmp_path), max_records={"train": 8, "validation": 4})
    train_adapter(load_model("tiny-gpt2", device="cpu"), "d", tmp_path / "ad",
                  TrainConfig(epochs=1, batch_size=8, max_length=32), data)
    meta = json.loads((tmp_path / "ad" / "lorasum.json").read_text())
    assert sum(meta["data"]["domains"][0]["skipped_empty"].values()) == 6


def test_a_split_left_empty_by_empty_records_is_the_empty_split_error(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": ""} for i in range(30)])
    dom = load_domain("d", DataConfig(data_dir=str(tmp_path)))
    with pytest.raises(LorasumError, match=r"domain 'd' has an empty train split \(0 records before caps, \d+ left "
                                           r"out for an empty question or answer"):
        require_nonempty([dom], "train")


def test_a_filter_on_a_field_no_record_has_is_refused(tmp_path, run_cli):
    write_jsonl(tmp_path / "math.jsonl", color_rows(30))
    err = one_line_error(stats_cli(run_cli, tmp_path, "math[nosuchfield=None]"), "math[nosuchfield=None]",
                         "field 'nosuchfield'", "no record of", "fields present: answer, category, question")
    assert "selects no records" not in err
    # a field some records lack is still a filter: `None` selects the records without it
    rows = color_rows(30)
    rows[0]["extra"] = "x"
    write_jsonl(tmp_path / "math.jsonl", rows)
    dom = load_domain("math[extra=None]", DataConfig(data_dir=str(tmp_path)))
    assert sum(dom.sizes().values()) == 29
