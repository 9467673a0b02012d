"""Registries instead of string dispatch: a composition or an analysis unit registered in one line flows into the
plan, the results and both reports; job kinds and report blocks dispatch through their dicts."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from conftest import write_smoke_domains
from lorasum.lm.data import DataConfig
from lorasum.lm.evaluate import evaluate
from lorasum.lm.models import load_model
from lorasum.report import sections
from lorasum.report.blocks import BLOCK_KINDS, Section, Table
from lorasum.report.sections import SECTIONS
from lorasum.study import grid, units
from lorasum.study.config import load_config
from lorasum.study.experiment import plan, run_experiment
from lorasum.study.jobs import JOB_KINDS
from lorasum.study.plan import Planner, SimKey, TrainKey
from lorasum.study.scores import load
from lorasum.study.units.unit import Assembly, Unit


def _half_sum(s: tuple[str, ...]) -> list[grid.Model]:
    """A dummy composition: half of each block."""
    return [grid.Model("half_sum", s, tuple((d, 0.5) for d in s))]


def test_a_registered_composition_flows_into_results_and_reports(tmp_path, monkeypatch):
    monkeypatch.setitem(grid.COMPOSITIONS, "half_sum", grid.Composition("half_sum", per_subset=_half_sum,
                                                                        baseline=True))
    data = write_smoke_domains(tmp_path / "data")
    cfg = load_config(preset="smoke", overrides={"data_dir": str(data), "domains": ["alpha", "beta"],
                                                 "compositions": ["sum", "half_sum"]})
    run = tmp_path / "run"
    results = run_experiment(cfg, run)

    assert results["models"]["half_sum[alpha+beta]"] == {"kind": "half_sum", "subset": ["alpha", "beta"],
                                                         "terms": [["alpha", 0.5], ["beta", 0.5]]}
    (row,) = results["compositions"]
    half = row["baselines"]["half_sum"]
    assert set(half) == {"perplexity", "macro", "pct_change"}

    # independent reference: evaluate the same two adapters at weight 0.5 in place, on the same test records
    p = plan(cfg, run.resolve())
    folders = [run / "adapters" / p.train[TrainKey(d, 0)]["key"] for d in ("alpha", "beta")]
    ref = evaluate(load_model("tiny-gpt2", device="cpu"), ["alpha", "beta"], [(f, 0.5) for f in folders],
                   DataConfig(str(data), max_records={"test": cfg.max_test}))["results"]
    assert math.isclose(half["perplexity"]["mean"], ref["pooled"]["perplexity"], rel_tol=1e-6)
    assert math.isclose(results["perplexity"]["half_sum[alpha+beta]"]["alpha"]["mean"], ref["alpha"]["perplexity"],
                        rel_tol=1e-6)
    merged = results["perplexity"]["adapter[alpha+beta]"]["pooled"]["mean"]
    assert math.isclose(half["pct_change"]["mean"], 100 * (ref["pooled"]["perplexity"] - merged) / merged,
                        rel_tol=1e-6)

    md = (run / "report.md").read_text(encoding="utf-8")
    assert "| combination | ppl merged | ppl half_sum | %Δ half_sum vs merged |" in md
    assert "| half_sum[alpha+beta] |" in md  # in the matrix of every model on every domain
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "<th>ppl half_sum</th>" in html
    on_disk = json.loads((run / "results.json").read_text(encoding="utf-8"))
    assert on_disk["compositions"][0]["baselines"]["half_sum"]["pct_change"]["ci"] == half["pct_change"]["ci"]


def _double_plan(p: Planner) -> None:
    """A dummy unit's job: each pair of fundamentals against twice the other (cosines ignore the scale)."""
    for seed in p.cfg.seeds:
        for x, y in itertools.combinations(p.cfg.domains, 2):
            p.similarity(SimKey("doubled", (x, y), seed), [(x, 1.0)], [(y, 2.0)])


def _double_assemble(a: Assembly, out: dict) -> dict:
    """Its part of results.json: per pair, the RMS and the norm of the doubled side over the pair's (from `pairs`)."""
    rows = {}
    for x, y in itertools.combinations(a.cfg.domains, 2):
        s, pair = a.sim("doubled", (x, y)), out["pairs"][f"{x}|{y}"]
        rows[f"{x}+{y}"] = {"rms": s["rms"], "pair_rms": pair["rms"],
                            "norm_ratio": sum(s["norm_b"].values()) / sum(pair["norm_b"].values())}
    return {"doubled": rows}


def _double_section(r: dict) -> list[Section]:
    """The report section a new unit adds beside it (report/ reads results.json only, never the study)."""
    rows = [[pair, f"{v['rms']:.4f}", f"{v['norm_ratio']:.3f}"] for pair, v in r.get("doubled", {}).items()]
    return [Section("Doubled pairs", [Table(["pair", "RMS", "norm ratio"], rows, "Each pair against twice the other")])]


def test_a_registered_unit_flows_into_the_plan_results_and_reports(tmp_path, monkeypatch):
    monkeypatch.setitem(units.UNITS, "doubled", Unit("doubled", _double_assemble, _double_plan))
    monkeypatch.setitem(sections.SECTIONS, "doubled", _double_section)
    data = write_smoke_domains(tmp_path / "data")
    cfg = load_config(preset="smoke", overrides={"data_dir": str(data), "domains": ["alpha", "beta"],
                                                 "compositions": ["sum"]})
    run = tmp_path / "run"
    results = run_experiment(cfg, run)

    spec = plan(cfg, run.resolve()).sims[SimKey("doubled", ("alpha", "beta"), 0)]  # planned, and its job ran
    row = results["doubled"]["alpha+beta"]
    assert spec["b"][0]["weight"] == 2.0 and math.isclose(load(spec)["rms"], row["rms"])
    assert math.isclose(row["rms"], row["pair_rms"], rel_tol=1e-9) and math.isclose(row["norm_ratio"], 2.0)
    on_disk = json.loads((run / "results.json").read_text(encoding="utf-8"))
    assert on_disk["doubled"] == results["doubled"]
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "## Doubled pairs" in md and f"| alpha+beta | {row['rms']:.4f} | 2.000 |" in md
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "Doubled pairs</h2>" in html and f"<td>{row['rms']:.4f}</td>" in html


def test_an_unregistered_composition_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(Exception, match="unknown composition 'half_sum'; known: sum, mean, best_single"):
        load_config(preset="smoke", overrides={"domains": ["a", "b"], "compositions": ["half_sum"]})


def test_registries_are_plain_dicts_keyed_by_name():
    assert list(JOB_KINDS) == ["train", "eval", "similarity", "inplace", "data_stats", "prompt_route", "weight_search", "predictors", "throughput"]
    assert all(k.name == name for name, k in JOB_KINDS.items())
    assert [k for k, j in JOB_KINDS.items() if not j.needs_model] == ["similarity"]
    assert list(grid.COMPOSITIONS)[:5] == grid.DEFAULT_COMPOSITIONS == ["sum", "mean", "best_single",
                                                                        "level2_plus_one", "unlearning"]
    from lorasum.delta.registry import METHODS, ROUTES  # every merge method, route and the weight search is graded
    assert set(grid.METHOD_COMPOSITIONS) == set(METHODS) - {"sum", "mean"} | {"weight_search"} | set(ROUTES)
    assert set(BLOCK_KINDS) == {"paragraph", "note", "table", "figures"}
    assert list(SECTIONS)[:3] == ["claims", "tables_3_4", "figures"] and list(SECTIONS)[-1] == "provenance"


def test_model_names_come_from_the_typed_value():
    s = ("math", "medicine", "finance")
    names = [m.name for m in grid.model_catalog(list(s), 3, list(grid.COMPOSITIONS)).models.values()]
    assert names[:8] == ["base", "adapter[math]", "adapter[medicine]", "adapter[finance]", "adapter[math+medicine]",
                         "adapter[math+finance]", "adapter[medicine+finance]", "adapter[math+medicine+finance]"]
    assert "level2+1[medicine+finance|math]" in names and "unlearn[math+medicine+finance-math]" in names
    assert names.count("sum[math+medicine+finance]") == 1 and "mean[math+finance]" in names
    cat = grid.model_catalog(list(s), 2, ["sum"])
    assert cat.find("sum", ("math", "finance")).name == "sum[math+finance]"
    assert cat.find("mean", ("math", "finance")) is None and not cat.of("unlearn")


def test_templates_escape_html_only_and_markdown_escapes_its_own(monkeypatch):
    """The same blocks through both templates: HTML autoescaped, markdown escaped as markdown (text stays text)."""
    from lorasum.report import render
    from lorasum.report.blocks import Figures, Note, Paragraph, Section, Table

    blocks = [Section("<h> & co", [Paragraph("a <script>x</script> **bold**"), Note("n < m"),
                                  Table(["<th>", "b"], [["x|y", "<td>"]], "cap & <i>"), Figures(("fig",))])]
    monkeypatch.setattr(render, "sections", lambda r: blocks)
    md = render.render_md({})
    assert md == ("# lorasum experiment report\n\n## \\<h\\> & co\n\n"
                  "a \\<script\\>x\\</script\\> \\*\\*bold\\*\\*\n\n*n \\< m*\n\n*cap & \\<i\\>*\n\n"
                  "| \\<th\\> | b |\n|---|---|\n| x\\|y | \\<td\\> |\n\n![fig](figures/fig.png)\n\n*fig*\n")
    html = render.render_html({}, {"fig": b"\x89PNG"})
    assert "<h2>&lt;h&gt; &amp; co</h2>" in html and "<p>a &lt;script&gt;x&lt;/script&gt; **bold**</p>" in html
    assert "<th>&lt;th&gt;</th>" in html and "<td>x|y</td><td>&lt;td&gt;</td>" in html
    assert '<p class=cap>cap &amp; &lt;i&gt;</p>' in html and "<script>" not in html
    assert 'src="data:image/png;base64,iVBORw=="' in html and "<figcaption>fig</figcaption>" in html
