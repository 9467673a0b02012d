"""Domains and splits, the template and answer mask, collation (pad == EOS), and `data stats` against hand counts."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from conftest import color_rows, shape_rows, write_jsonl

from lorasum.lm.data import (DataConfig, Record, collate, load_domain, parse_spec, partition_domains,
                          partition_records, tokenize_record, tokenize_records)
from lorasum.errors import LorasumError
from lorasum.lm.models import byte_tokenizer


def qa(records) -> set[tuple[str, str]]:
    return {(r.question, r.answer) for r in records}


def split_sets(domain) -> dict[str, set]:
    return {s: qa(domain.records[s]) for s in ("train", "validation", "test")}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def rows():
    """600 records with categories; enough that every split and every category is populated."""
    rs = color_rows(400) + shape_rows(200)
    return rs


# --- splits ---------------------------------------------------------------------------------------------------------
def test_split_is_deterministic_and_independent_of_file_order(tmp_path, rows):
    write_jsonl(tmp_path / "a" / "d.jsonl", rows)
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != rows
    write_jsonl(tmp_path / "b" / "d.jsonl", shuffled)
    d1 = load_domain("d", DataConfig(data_dir=str(tmp_path / "a")))
    d2 = load_domain("d", DataConfig(data_dir=str(tmp_path / "a")))
    d3 = load_domain("d", DataConfig(data_dir=str(tmp_path / "b")))
    for s in ("train", "validation", "test"):
        # same seed, same file -> the same records in the same order; shuffled file -> same records, same order
        assert [(r.question, r.answer) for r in d1.records[s]] == [(r.question, r.answer) for r in d2.records[s]]
        assert [(r.question, r.answer) for r in d1.records[s]] == [(r.question, r.answer) for r in d3.records[s]]
    assert d1.source_sha256 != d3.source_sha256  # the file hash sees the order, the split does not


def test_splits_are_disjoint_cover_everything_and_are_80_10_10(tmp_path):
    rows = color_rows(3000)
    write_jsonl(tmp_path / "d.jsonl", rows)
    d = load_domain("d", DataConfig(data_dir=str(tmp_path)))
    sets = split_sets(d)
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert sets["train"] | sets["validation"] | sets["test"] == {(r["question"], r["answer"]) for r in rows}
    n = len(rows)
    # binomial sd of the train share at n=3000 is 0.0073; of validation/test 0.0055: 5 sd bounds
    assert abs(len(sets["train"]) / n - 0.8) < 0.037
    assert abs(len(sets["validation"]) / n - 0.1) < 0.028
    assert abs(len(sets["test"]) / n - 0.1) < 0.028
    assert d.available == {s: len(v) for s, v in sets.items()}


def test_split_follows_the_documented_content_hash(tmp_path):
    """sha256("<seed>\\0<question>\\0<answer>")[:8] / 2**64: < 0.8 train, < 0.9 validation, else test."""
    rows = color_rows(300)
    write_jsonl(tmp_path / "d.jsonl", rows)
    for seed in (0, 5):
        d = load_domain("d", DataConfig(data_dir=str(tmp_path), split_seed=seed))
        got = {(r.question, r.answer): s for s in ("train", "validation", "test") for r in d.records[s]}
        for row in rows:
            h = hashlib.sha256(f"{seed}\x00{row['question']}\x00{row['answer']}".encode()).digest()
            u = int.from_bytes(h[:8], "big") / 2**64
            want = "train" if u < 0.8 else "validation" if u < 0.9 else "test"
            assert got[(row["question"], row["answer"])] == want


def test_split_seed_moves_records(tmp_path, rows):
    write_jsonl(tmp_path / "d.jsonl", rows)
    a = split_sets(load_domain("d", DataConfig(data_dir=str(tmp_path), split_seed=0)))
    b = split_sets(load_domain("d", DataConfig(data_dir=str(tmp_path), split_seed=1)))
    moved = len(a["test"] - b["test"])
    assert moved > len(a["test"]) // 2  # an independent hash: most test records leave the test split
    assert a["train"] != b["train"]
    assert a["train"] | a["validation"] | a["test"] == b["train"] | b["validation"] | b["test"]


def test_subdomain_inherits_parent_split(tmp_path, rows):
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(data_dir=str(tmp_path))
    parent = load_domain("d", cfg)
    where = {(r.question, r.answer): s for s, recs in parent.records.items() for r in recs}
    for spec, expect in (("d[category=even]", lambda r: r["category"] == "even"),
                         ("d[category=triangle|square]", lambda r: r["category"] in ("triangle", "square"))):
        child = load_domain(spec, cfg)
        want = {(r["question"], r["answer"]) for r in rows if expect(r)}
        got = split_sets(child)
        assert got["train"] | got["validation"] | got["test"] == want
        for s, recs in child.records.items():
            assert all(where[(r.question, r.answer)] == s for r in recs)  # same split as in the parent
            assert all(r.domain == spec for r in recs)
        # no test record of the parent is a training record of the child (and vice versa)
        assert not split_sets(parent)["test"] & got["train"]
        assert not split_sets(parent)["train"] & got["test"]
        assert got["test"] == split_sets(parent)["test"] & want


def test_two_filters_are_and_ed(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "category": "x" if i % 2 else "y", "qtype": str(i % 3)}
            for i in range(60)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    child = load_domain("d[category=x, qtype=1|2]", DataConfig(data_dir=str(tmp_path)))
    got = set().union(*split_sets(child).values())
    assert got == {(r["question"], r["answer"]) for r in rows if r["category"] == "x" and r["qtype"] in "12"}


def test_partition_test_set_is_union_of_domain_test_sets(tmp_path):
    write_jsonl(tmp_path / "colors.jsonl", color_rows(300))
    write_jsonl(tmp_path / "shapes.jsonl", shape_rows(300))
    cfg = DataConfig(data_dir=str(tmp_path))
    domains = [load_domain(d, cfg) for d in partition_domains("colors+shapes")]
    alone = {d: split_sets(load_domain(d, cfg)) for d in ("colors", "shapes")}
    for s in ("train", "validation", "test"):
        merged = partition_records(domains, s, seed=3)
        assert len(merged) == len(alone["colors"][s]) + len(alone["shapes"][s])
        assert qa(merged) == alone["colors"][s] | alone["shapes"][s]
    # concatenated then shuffled: both domains are interleaved, deterministically for a seed
    merged = partition_records(domains, "train", seed=3)
    assert merged == partition_records(domains, "train", seed=3)
    assert merged != partition_records(domains, "train", seed=4)
    first_half = {r.domain for r in merged[: len(merged) // 2]}
    assert first_half == {"colors", "shapes"}
    assert partition_records(domains, "test", shuffle=False) == domains[0].records["test"] + domains[1].records["test"]


def test_partition_domains_syntax():
    assert partition_domains("math") == ["math"]
    assert partition_domains("math + medicine[category=GARD]") == ["math", "medicine[category=GARD]"]
    for bad in ("math+", "+math", "math++x", "math+math"):
        with pytest.raises(LorasumError):
            partition_domains(bad)
    assert parse_spec("medicine[category=GARD|NIDDK,qtype=symptoms]") == (
        "medicine", {"category": {"GARD", "NIDDK"}, "qtype": {"symptoms"}})
    with pytest.raises(LorasumError, match="bad filter 'category'"):
        parse_spec("medicine[category]")


def test_caps_keep_a_content_defined_subset(tmp_path, rows):
    write_jsonl(tmp_path / "a" / "d.jsonl", rows)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    write_jsonl(tmp_path / "b" / "d.jsonl", shuffled)
    full = load_domain("d", DataConfig(data_dir=str(tmp_path / "a")))
    caps = {"train": 10, "validation": 3, "test": 1000}
    a = load_domain("d", DataConfig(data_dir=str(tmp_path / "a"), max_records=caps))
    b = load_domain("d", DataConfig(data_dir=str(tmp_path / "b"), max_records=caps))
    assert a.sizes() == {"train": 10, "validation": 3, "test": len(full.records["test"])}
    assert a.available == full.available  # counts before capping are kept for the fingerprint
    for s in ("train", "validation", "test"):
        assert [(r.question, r.answer) for r in a.records[s]] == [(r.question, r.answer) for r in b.records[s]]
        assert qa(a.records[s]) <= qa(full.records[s])  # capping never moves a record to another split
    # the kept records are those with the smallest content keys
    keys = sorted(r.key for r in full.records["train"])
    assert sorted(r.key for r in a.records["train"]) == keys[:10]
    fp = a.fingerprint()
    assert fp["split_sizes"] == a.sizes() and fp["available"] == full.available and fp["source"] == "d.jsonl"
    assert fp["sha256"] == hashlib.sha256((tmp_path / "a" / "d.jsonl").read_bytes()).hexdigest()


def test_csv_and_custom_field_names(tmp_path):
    import csv

    rows = [{"prompt": f"q{i}", "response": f"r{i}"} for i in range(50)]
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "response"])
        w.writeheader()
        w.writerows(rows)
    write_jsonl(tmp_path / "j.jsonl", [{"question": r["prompt"], "answer": r["response"]} for r in rows])
    c = load_domain("d", DataConfig(data_dir=str(tmp_path), question_field="prompt", answer_field="response"))
    j = load_domain(str(tmp_path / "j.jsonl"))  # a direct file path needs no data dir
    assert split_sets(c) == split_sets(j)
    with pytest.raises(LorasumError, match=r"d\.csv:2: record has no text field 'question'"):
        load_domain("d", DataConfig(data_dir=str(tmp_path)))


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "env.jsonl", color_rows(20))
    monkeypatch.setenv("LORASUM_DATA_DIR", str(tmp_path))
    assert sum(load_domain("env").sizes().values()) == 20
    monkeypatch.delenv("LORASUM_DATA_DIR")
    with pytest.raises(LorasumError, match="needs a data directory"):
        load_domain("env")


# --- template, answer mask, collation ------------------------------------------------------------------------------
def test_template_text_and_answer_mask(tok):
    rec = Record("2+2?", "4", "d", 0.0)
    ex = tokenize_record(tok, rec, max_length=64)
    eos = tok.eos_token_id
    # the byte tokenizer has one token per byte: hand count "Question: 2+2?\nAnswer:" = 10 + 4 + 1 + 7 = 22 tokens,
    # then " 4" (2 tokens) and EOS
    assert len(ex.input_ids) == 25 and ex.full_length == 25 and not ex.truncated
    assert tok.decode(ex.input_ids) == "Question: 2+2?\nAnswer: 4<|endoftext|>"
    assert ex.input_ids[-1] == eos and ex.input_ids.count(eos) == 1
    assert ex.answer_mask == [0] * 22 + [1] * 3
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.answer_mask) if m]) == " 4<|endoftext|>"
    assert ex.input_ids == tok("Question: 2+2?\nAnswer: 4")["input_ids"] + [eos]


def test_truncation_cuts_the_answer(tok):
    rec = Record("2+2?", "4", "d", 0.0)
    cut = tokenize_record(tok, rec, max_length=23)  # the prompt (22) and the space survive, not '4' nor EOS
    assert cut.truncated and cut.full_length == 25 and len(cut.input_ids) == 23
    assert cut.answer_mask == [0] * 22 + [1]
    assert eos_not_in(cut, tok)
    gone = tokenize_record(tok, rec, max_length=22)
    assert sum(gone.answer_mask) == 0 and tok.decode(gone.input_ids) == "Question: 2+2?\nAnswer:"
    with pytest.raises(LorasumError, match="max_length 7 is too short"):
        tokenize_records(tok, [rec], 7)


def eos_not_in(ex, tok) -> bool:
    return tok.eos_token_id not in ex.input_ids


def test_collate_masks_padding_by_attention_not_by_token_id(tok):
    assert tok.pad_token_id == tok.eos_token_id  # the situation of SmolLM2, reproduced by the tiny tokenizer
    short = tokenize_record(tok, Record("a", "b", "d", 0.0), 64)
    long = tokenize_record(tok, Record("a longer question", "and answer", "d", 0.0), 64)
    batch = collate([short, long], tok.pad_token_id)
    n, k = len(long.input_ids), len(short.input_ids)
    assert batch["input_ids"].shape == (2, n)
    assert batch["attention_mask"][0].tolist() == [1] * k + [0] * (n - k)
    assert batch["attention_mask"][1].tolist() == [1] * n
    eos = tok.eos_token_id
    # the real EOS of each record is a label; the padding (the same token id) is not
    assert batch["labels"][0, k - 1] == eos and batch["labels"][1, n - 1] == eos
    assert (batch["labels"][0, k:] == -100).all() and (batch["input_ids"][0, k:] == eos).all()
    assert batch["labels"][0, :k].tolist() == short.input_ids
    ans = collate([short, long], tok.pad_token_id, loss_on="answer")
    assert ans["labels"][1].tolist() == [t if m else -100 for t, m in zip(long.input_ids, long.answer_mask)]
    assert (ans["labels"][0, k:] == -100).all()
    with pytest.raises(LorasumError, match="loss_on must be"):
        collate([short], tok.pad_token_id, loss_on="prompt")


# --- data stats ------------------------------------------------------------------------------------------------------
def _first_in(split: str, make, seed: int = 0, start: int = 0) -> dict:
    """The first record make(i), i >= start, that lands in `split` (found through the documented hash)."""
    for i in range(start, start + 10_000):
        row = make(i)
        h = hashlib.sha256(f"{seed}\x00{row['question']}\x00{row['answer']}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        if ("train" if u < 0.8 else "validation" if u < 0.9 else "test") == split:
            return row
    raise AssertionError("no record found")


def test_data_stats_against_hand_counts(tmp_path, run_cli):
    # Byte tokenizer: "Question: q007\nAnswer:" is 10 + 4 + 1 + 7 = 22 tokens; " 7" + EOS is 3 more (25 in all).
    t0 = _first_in("test", lambda i: {"question": f"q{i:03d}", "answer": str(i % 10)})
    t1 = _first_in("test", lambda i: {"question": f"q{i:03d}", "answer": str(i % 10)}, start=int(t0["question"][1:]) + 1)
    # train: one record repeating t0's question (a duplicate across splits) with a 2-char answer (26 tokens),
    # and one ordinary record (25 tokens)
    r0 = _first_in("train", lambda i: {"question": t0["question"], "answer": f"{i:02d}"})
    r1 = _first_in("train", lambda i: {"question": f"t{i:03d}", "answer": str(i % 10)})
    write_jsonl(tmp_path / "d.jsonl", [t0, r0, t1, r1])

    def stats(max_length):
        rc, out, err, _ = run_cli("data", "stats", "d", "--model", "tiny-gpt2", "--data-dir", tmp_path,
                                  "--max-length", max_length, "--json")
        assert rc == 0, err
        return {r["split"]: r for r in json.loads(out)}

    # max length 23: every record keeps its 22 prompt tokens and one answer token (the space)
    rows = stats(23)
    t, tr, v = rows["test"], rows["train"], rows["validation"]
    assert (t["records"], t["tokens"], t["truncated_share"], t["answer_cut_off"]) == (2, 46, 1.0, 0)
    assert t["answer_token_share"] == pytest.approx(2 / 46)
    assert t["mean_tokens_before_truncation"] == pytest.approx(25)
    assert t["duplicates_across_splits"] == 1  # t0's question is also a train question; t1's is not
    assert (tr["records"], tr["tokens"], tr["truncated_share"], tr["answer_cut_off"]) == (2, 46, 1.0, 0)
    assert tr["mean_tokens_before_truncation"] == pytest.approx((26 + 25) / 2)
    assert tr["duplicates_across_splits"] == 1
    assert (v["records"], v["tokens"], v["duplicates_across_splits"]) == (0, 0, 0)

    # max length 22: the answers are cut off entirely, EOS included
    rows = stats(22)
    for s in ("test", "train"):
        assert (rows[s]["tokens"], rows[s]["answer_cut_off"], rows[s]["answer_token_share"]) == (44, 2, 0.0)

    # room for everything: nothing truncated; answer tokens include the EOS
    rows = stats(200)
    assert (rows["test"]["tokens"], rows["test"]["truncated_share"]) == (50, 0.0)
    assert rows["test"]["answer_token_share"] == pytest.approx(6 / 50)
    assert (rows["train"]["tokens"], rows["train"]["truncated_share"]) == (51, 0.0)
    assert rows["train"]["answer_token_share"] == pytest.approx(7 / 51)

    # the table form: a header naming the columns, one line per domain and split
    rc, out, err, _ = run_cli("data", "stats", "d", "--model", "tiny-gpt2", "--data-dir", tmp_path,
                              "--max-length", 22)
    lines = out.splitlines()
    assert rc == 0 and "no answer" in lines[0]
    assert lines[1].split()[:5] == ["d", "train", "2", "0", "44"]  # domain, split, records, left out, tokens


def test_parquet_matches_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = color_rows(80)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    write_jsonl(tmp_path / "j.jsonl", rows)
    p = load_domain("p[category=odd]", DataConfig(data_dir=str(tmp_path)))
    j = load_domain("j[category=odd]", DataConfig(data_dir=str(tmp_path)))
    assert split_sets(p) == split_sets(j) and sum(p.sizes().values()) == 40
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(LorasumError, match=r"bad\.parquet: cannot read parquet"):
        load_domain("bad", DataConfig(data_dir=str(tmp_path)))


def test_a_byte_order_mark_is_read_as_utf8_in_jsonl_and_csv(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "q?", "answer": "a"}).encode()
                                         + b"\n" + json.dumps({"question": "r?", "answer": "b"}).encode() + b"\n")
    (tmp_path / "bomc.csv").write_bytes(b"\xef\xbb\xbfquestion,answer\nq?,a\nr?,b\n")
    for name in ("bom", "bomc"):
        d = load_domain(name, DataConfig(data_dir=str(tmp_path)))
        assert sorted(r.question for s in d.records.values() for r in s) == ["q?", "r?"]


def test_a_csv_field_larger_than_the_csv_module_default_is_read(tmp_path):
    long = "x" * 200_000  # the csv module refuses fields over 131,072 characters by default
    (tmp_path / "long.csv").write_text(f"question,answer\nq?,{long}\n", encoding="utf-8")
    d = load_domain("long", DataConfig(data_dir=str(tmp_path)))
    assert [r.answer for s in d.records.values() for r in s] == [long]


@pytest.mark.parametrize("make, spec, culprits", [
    (lambda d: (d / "math.json").write_text('{"question": "q", "answer": "a"}\n'), "math.json",
     ["math.json", "unsupported data file extension '.json'", ".jsonl"]),
    (lambda d: (d / "math.json").write_text('{"question": "q", "answer": "a"}\n'), "{d}/math.json",
     ["unsupported data file extension '.json'"]),
    (lambda d: (d / "math.jsonl").mkdir(), "math", ["math.jsonl is a folder, not a data file"]),
    (lambda d: (d / "math.jsonl").mkdir(), "{d}/math.jsonl", ["math.jsonl is a folder, not a data file"]),
])
def test_unsupported_or_folder_data_sources_are_named(make, spec, culprits, tmp_path):
    make(tmp_path)
    with pytest.raises(LorasumError) as e:
        load_domain(spec.format(d=tmp_path), DataConfig(data_dir=str(tmp_path)))
    for c in culprits:
        assert c in str(e.value)
