"""The report of a real `smoke` run: every required section, finite numbers in every table, figures embedded,
notes where rows are skipped, and `lorasum report` re-rendering the same bytes as the run."""

import base64
import json
import math
import re
import shutil
from html.parser import HTMLParser

import pytest

from conftest import write_smoke_domains
from lorasum.cli.main import main

DOMAINS = ["alpha", "beta", "gamma"]
FIGURE_NAMES = ("rms_vs_pct_change", "cosine_heatmap", "perplexity_bars")
# heading prefix -> must hold at least one table
REQUIRED = {"Findings": False, "Table 3": True, "Table 4": True, "Table 2": True,
            "Each fundamental block vs the sum of the others": True, "Table 5": True,
            "Perplexity of every model on every domain": True, "Unlearning": True, "Weight space": True,
            "Figures": False, "Data": True, "Provenance": True}
NUMBER = re.compile(r"(?<![\w.])[-+−]?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|nan|inf)(?![\w])", re.I)
NOT_A_NUMBER = re.compile(r"\b(nan|inf|none)\b|(?<!random )\bnull\b", re.I)  # "random null": a reference


def _run(root, name, extra_config=None):
    data = write_smoke_domains(root / "data")
    args = ["experiment", "--preset", "smoke", "--domains", *DOMAINS, "--data-dir", str(data),
            "--out", str(root / name)]
    if extra_config:
        cfg = root / f"{name}.json"
        cfg.write_text(json.dumps(extra_config))
        args += ["--config", str(cfg)]
    assert main(args) == 0
    return root / name


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A full smoke grid; the report files as rendered in-process by the run are kept aside before any test."""
    root = tmp_path_factory.mktemp("report")
    run = _run(root, "run")
    shutil.copy(run / "report.md", root / "in_run.md")
    shutil.copy(run / "report.html", root / "in_run.html")
    return run


def md_sections(md: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", md, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def section(sections: dict, prefix: str) -> str:
    hits = [body for head, body in sections.items() if head.startswith(prefix)]
    assert len(hits) == 1, f"expected one section '{prefix}...', found {len(hits)} in {list(sections)}"
    return hits[0]


def md_tables(body: str) -> list[list[list[str]]]:
    """Tables of a section: rows of cells, the header row included (the |---| row dropped)."""
    tables, cur = [], []
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(---\|)+", line):
                cur.append([c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")])
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def assert_finite_cells(where: str, rows: list[list[str]]) -> None:
    head, body = rows[0], rows[1:]
    assert body, f"{where}: empty table"
    for row in body:
        assert len(row) == len(head), f"{where}: ragged row {row}"
        for name, cell in zip(head, row):
            assert cell != "", f"{where}: empty cell in column '{name}' of {row}"
            assert not NOT_A_NUMBER.search(cell), f"{where}: non-finite cell '{cell}' in column '{name}'"
            for m in NUMBER.findall(cell):
                assert math.isfinite(float(m.replace("−", "-"))), f"{where}: '{cell}'"
            if name.startswith("paper: merged"):  # our row beside the paper's, or a dash
                assert cell == "—" or NUMBER.search(cell), f"{where}: '{cell}'"


def test_report_md_has_every_section_and_finite_tables(run):
    md = (run / "report.md").read_text(encoding="utf-8")
    secs = md_sections(md)
    for prefix, has_table in REQUIRED.items():
        body = section(secs, prefix)
        tables = md_tables(body)
        assert bool(tables) == has_table or (tables and has_table), f"{prefix}: tables {len(tables)}"
        for i, t in enumerate(tables):
            if prefix != "Provenance":  # free text (versions, a git revision) is not a number cell
                assert_finite_cells(f"{prefix} table {i}", t)
    r = json.loads((run / "results.json").read_text())
    # Table 2: one per-layer table per pair of fundamentals, layer index x module kind
    t2 = md_tables(section(secs, "Table 2"))
    assert len(t2) == 3 and t2[0][0] == ["layer", "attn.c_attn", "attn.c_proj", "mlp.c_proj"]
    assert [row[0] for row in t2[0][1:]] == ["0", "1"]
    # each block against the sum of the other two, per layer; Table 5 likewise
    assert len(md_tables(section(secs, "Each fundamental block"))) == 3
    assert len(md_tables(section(secs, "Table 5"))) == 3
    # Table 3: ours (pairs, with macro means), the paper's published values labelled as the paper's, baselines
    t3 = md_tables(section(secs, "Table 3"))
    assert [row[0] for row in t3[0][1:]] == ["alpha + beta", "alpha + gamma", "beta + gamma"]
    assert "macro merged / summed" in t3[0][0]
    body3 = section(secs, "Table 3")
    assert "482.87" in body3 and "the paper's values (GPT-2 small, their data)" in body3
    base = next(t for t in t3 if "ppl mean (1/k)" in t[0])
    assert "ppl best single" in base[0] and "best single: block" in base[0] and len(base) == 4
    assert "chosen per subset by the lowest pooled validation perplexity" in body3
    # Table 4: the triple and its three level-2 + fundamental rows, beside the paper's Table 4
    t4 = md_tables(section(secs, "Table 4"))
    assert len(t4[0]) == 5 and "260.35" in section(secs, "Table 4")
    # weight space: the summary and a per-layer table (cos / norm ratio) for every composition
    ws = md_tables(section(secs, "Weight space"))
    assert len(ws) == 1 + len(r["compositions"]) and re.fullmatch(r"\d\.\d{3} / \d+\.\d{2}", ws[1][1][1])
    # perplexity matrix: every model, base first, in the grid's order
    pm = md_tables(section(secs, "Perplexity of every model"))[0]
    assert [row[0] for row in pm[1:]][:4] == ["base", "adapter[alpha]", "adapter[beta]", "adapter[gamma]"]
    assert {row[0] for row in pm[1:]} == set(r["models"])
    # the unlearning table: three removed domains, five rows each
    assert len(md_tables(section(secs, "Unlearning"))[0]) == 1 + 3 * 5
    # findings: one verdict per claim, from the fixed rules
    assert all(f"**{f['verdict']}**" in section(secs, "Findings") for f in r["findings"])
    for name in FIGURE_NAMES:
        assert f"![{name}](figures/{name}.png)" in section(secs, "Figures")


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.heads, self.imgs, self._in = [], [], [], None

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self._in = tag
            (self.cells if tag == "td" else self.heads).append("")
        elif tag == "img":
            self.imgs.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in:
            (self.cells if self._in == "td" else self.heads)[-1] += data


def test_report_html_embeds_figures_and_every_cell_is_finite(run):
    html = (run / "report.html").read_text(encoding="utf-8")
    p = _Cells()
    p.feed(html)
    imgs = {i["alt"]: i["src"] for i in p.imgs}
    for name in FIGURE_NAMES:
        assert imgs[name].startswith("data:image/png;base64,"), name
        png = base64.b64decode(imgs[name].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == (run / "figures" / f"{name}.png").read_bytes()
    for head in ("Table 2", "Table 3", "Table 4", "Table 5", "Perplexity of every model", "Unlearning",
                 "Weight space", "Data", "Provenance", "Findings", "Each fundamental block vs the sum"):
        assert re.search(rf"<h2>{re.escape(head)}", html), head
    assert len(p.cells) > 200
    for cell in p.cells:
        assert not NOT_A_NUMBER.search(cell), cell
        for m in NUMBER.findall(cell):
            assert math.isfinite(float(m.replace("−", "-"))), cell


def test_smoke_data_keeps_its_answers(run):
    """The test data is short enough that truncation at smoke's max length leaves every answer in place."""
    r = json.loads((run / "results.json").read_text())
    stats = r["data"]["stats"]
    assert {s["domain"] for s in stats} == set(DOMAINS)
    for s in stats:
        assert s["answer_cut_off"] == 0 and s["truncated_share"] == 0.0 and s["answer_token_share"] > 0.2, s


def test_lorasum_report_rerenders_the_same_bytes(run):
    """results.json is written with sorted keys; the renderer orders rows itself, so a re-render is identical."""
    root = run.parent
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_bytes() == (root / "in_run.md").read_bytes()
    assert (run / "report.html").read_bytes() == (root / "in_run.html").read_bytes()


def test_best_single_is_chosen_on_validation(run):
    r = json.loads((run / "results.json").read_text())
    for c in r["compositions"]:
        bs = c["baselines"]["best_single"]
        assert bs["chosen_on"] == "validation" and set(bs["validation_perplexity"]) == set(c["subset"])
        assert bs["block"] == min(bs["validation_perplexity"], key=bs["validation_perplexity"].get)
        assert bs["perplexity"]["mean"] == pytest.approx(r["perplexity"][f"adapter[{bs['block']}]"]["pooled"]["mean"]) \
            if len(c["subset"]) == 3 else True


def test_block_vs_rest_keeps_per_layer_cosines(run):
    r = json.loads((run / "results.json").read_text())
    triple = next(c for c in r["compositions"] if c["level"] == 3)
    pair_layers = set(r["pairs"]["alpha|beta"]["layers"])
    for d in DOMAINS:
        v = triple["block_vs_rest"][d]
        assert set(v["layers"]) == pair_layers
        assert v["rms"] == pytest.approx(math.sqrt(sum(x * x for x in v["layers"].values()) / len(v["layers"])))


def test_skipped_rows_are_announced_under_their_headings(tmp_path):
    run = _run(tmp_path, "lvl2", {"max_level": 2, "compositions": ["sum", "best_single", "unlearning"]})
    secs = md_sections((run / "report.md").read_text(encoding="utf-8"))
    assert "*skipped: max_level 2 < 3 domains" in section(secs, "Table 4")
    assert "*skipped: max_level 2 < 3 domains (unlearning" in section(secs, "Unlearning")
    assert "*skipped: max_level 2 < 3 domains" in section(secs, "Table 5") or \
        "*skipped: 'level2_plus_one' is not in compositions.*" in section(secs, "Table 5")
    assert "*skipped: max_level 2 < 3 domains" in section(secs, "Each fundamental block")
    assert "*mean (1/k) baseline skipped: 'mean' is not in compositions.*" in section(secs, "Table 3")
    assert not md_tables(section(secs, "Unlearning"))
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "<p class=note>skipped: max_level 2 &lt; 3 domains" in html


def test_module_columns_in_block_order():
    """Table 2 / heatmap columns: attention before MLP, each in the order the block runs its modules."""
    from lorasum.report.figures import kind_key

    llama = ["mlp.down_proj", "self_attn.v_proj", "mlp.up_proj", "self_attn.o_proj", "self_attn.k_proj",
             "mlp.gate_proj", "self_attn.q_proj"]
    assert sorted(llama, key=kind_key) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    gpt2 = ["mlp.c_proj", "attn.c_proj", "mlp.c_fc", "attn.c_attn"]
    assert sorted(gpt2, key=kind_key) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def test_scatter_of_an_older_results_file_still_draws_its_points(run, monkeypatch):
    """A results.json from before the fit over pair means has per-seed `fit.points` and no `fit.pairs`."""
    import copy

    from lorasum.report import figures

    results = json.loads((run / "results.json").read_text())
    old = copy.deepcopy(results)
    old["fit"].pop("pairs", None)
    old["fit"].pop("points_per_seed", None)
    drawn = []
    import matplotlib.axes

    orig = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter",
                        lambda self, x, y, *a, **k: drawn.append(len(x)) or orig(self, x, y, *a, **k))
    figures.rms_scatter(old)
    assert drawn and drawn[0] == len(old["fit"]["points"]) > 0
