"""The report of a real `smoke` run: the answer first (what was run, the claims, the headline figure), then the main
tables, the other figures and the detail (collapsed); finite numbers in every table, figures embedded with alt text
and captions, user-chosen names escaped in both formats, notes where rows are skipped, and `lorasum report`
re-rendering the same bytes as the run. tests/test_report_browser.py opens the same report in Chromium."""

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
REQUIRED = {"Claims of the paper": True, "Findings": True, "Table 3": True, "Table 4": True, "Table 2": True,
            "Each fundamental block vs the sum of the others": True, "Table 5": True,
            "Perplexity of every model on every domain": True, "Unlearning": True, "Weight space": True,
            "Figures": False, "Data": True, "Provenance": True}
NUMBER = re.compile(r"(?<![\w.])[-+−]?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|nan|inf)(?![\w])", re.I)
MD_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # a backslash-escaped ASCII punctuation character
NOT_A_NUMBER = re.compile(r"\b(nan|inf|none)\b|(?<!random )\bnull\b", re.I)  # "random null": a reference


def _run(root, name, extra_config=None):
    data = write_smoke_domains(root / "data")
    args = ["experiment", "--preset", "smoke", "--domains", *DOMAINS, "--data-dir", str(data),
            "--out", str(root / name)]
    cfg = root / f"{name}.json"  # on the CPU: the tests read the smoke run's CPU figures (e.g. an "even" change)
    cfg.write_text(json.dumps({"device": "cpu", **(extra_config or {})}))
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
                cur.append([MD_ESCAPE.sub(r"\1", c.strip()) for c in line.strip("|").split(" | ")])
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
    assert len(ws) == 1 + len(r["compositions"]) and re.fullmatch(r"-?\d\.\d{3} / \d\.\d{2,3}", ws[1][1][1])
    # perplexity matrix: every model, base first, in the grid's order
    pm = md_tables(section(secs, "Perplexity of every model"))[0]
    assert [row[0] for row in pm[1:]][:4] == ["base", "adapter[alpha]", "adapter[beta]", "adapter[gamma]"]
    assert {row[0] for row in pm[1:]} == set(r["models"])
    # the unlearning table: three removed domains, five rows each
    assert len(md_tables(section(secs, "Unlearning"))[0]) == 1 + 3 * 5
    # findings: one verdict per claim, from the fixed rules
    assert all(f"**{f['verdict']}**" in section(secs, "Findings") for f in r["findings"])
    assert "](figures/rms_vs_pct_change.png)" in section(secs, "Claims of the paper")  # the headline figure
    for name in FIGURE_NAMES[1:]:
        assert f"](figures/{name}.png)" in section(secs, "Figures")


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
    assert all(i["src"].startswith("data:image/png;base64,") for i in p.imgs)
    embedded = [base64.b64decode(i["src"].split(",", 1)[1]) for i in p.imgs]
    assert sorted(embedded) == sorted(f.read_bytes() for f in (run / "figures").glob("*.png"))
    for name in FIGURE_NAMES:
        assert (run / "figures" / f"{name}.png").read_bytes() in embedded, name
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
    assert "*skipped: max_level 2 \\< 3 domains" in section(secs, "Table 4")
    assert "*skipped: max_level 2 \\< 3 domains (unlearning" in section(secs, "Unlearning")
    assert "*skipped: max_level 2 \\< 3 domains" in section(secs, "Table 5") or \
        "*skipped: 'level2_plus_one' is not in compositions.*" in section(secs, "Table 5")
    assert "*skipped: max_level 2 \\< 3 domains" in section(secs, "Each fundamental block")
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


def _h2s(html: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", h).replace("&amp;", "&") for h in re.findall(r"<h2>(.*?)</h2>", html)]


def test_the_answer_comes_first_and_both_formats_share_the_order(run):
    """What was run, the claims and the headline figure; then Tables 3 and 4, the other figures, then the detail,
    which is collapsed in both formats (report.md folds it in <details>, as GitHub draws it)."""
    r = json.loads((run / "results.json").read_text())
    md = (run / "report.md").read_text(encoding="utf-8")
    html = (run / "report.html").read_text(encoding="utf-8")
    md_heads = [h.replace("\\", "") for h in re.findall(r"^## (.+)$", md, flags=re.M)]
    assert [h for h in _h2s(html) if not h.startswith("Speed")] == md_heads  # speed: wall times, HTML only
    assert md_heads[:4] == ["Claims of the paper", "Table 3 — pairs: merged-data vs summed fundamentals",
                            "Table 4 — three-domain compositions", "Figures"]
    title, facts = md.split("\n\n")[:2]
    records = {sp: sum(s["records"] for s in r["data"]["stats"] if s["split"] == sp)
               for sp in ("train", "validation", "test")}
    for fact in ("**model** tiny-gpt2", "**domains** alpha, beta, gamma", "**seeds** 0", "**init** independent",
                 f"**records** {records['train']} train, {records['validation']} validation, {records['test']} test"):
        assert fact in facts, (fact, facts)
    assert "**time**" not in md and re.search(r"<dt>time</dt><dd>[\d.]+ s of compute over \d+ jobs</dd>", html)
    secs = md_sections(md)
    folded = [h for h, body in secs.items() if body.lstrip().startswith("<details><summary>")]
    assert folded == md_heads[md_heads.index(folded[0]):], "the detail is the tail of the report"
    for prefix in ("Table 2", "Each fundamental block", "Table 5", "Weight space", "Perplexity of every model"):
        body = section(secs, prefix)
        summary = re.match(r"\s*<details><summary>(.+?)</summary>\n\n", body)
        assert summary and re.search(r"\d", summary.group(1)) and body.rstrip().endswith("</details>"), prefix
    t2 = section(secs, "Table 2")
    assert re.search(r"<summary>3 pairs × 6 layers; mean cosine [-+]\d\.\d{3}; largest \|cos\| \d\.\d{3} \(\w+ vs \w+, "
                     r"transformer\.h\.\d\.\w+\.c_\w+\)</summary>", t2), t2[:300]
    for prefix in ("Claims", "Table 3", "Table 4", "Figures", "Findings", "References", "Unlearning —"):
        assert "<details>" not in section(secs, prefix), prefix
    claims = md_tables(section(secs, "Claims of the paper"))[0]
    assert [row[1] for row in claims[1:]] == [f"**{c['verdict']}**" for c in r["claims"]]


def test_every_table_has_a_caption_and_every_figure_alt_text_and_a_caption(run):
    html = (run / "report.html").read_text(encoding="utf-8")
    assert html.count("<table") == len(re.findall(r"<p class=cap>[^<]{30,}</p>\n<div class=tw><table", html)) > 20
    figures = re.findall(r'<figure><img alt="([^"]+)" width=(\d+) height=(\d+) src="data:image/png;base64,[^"]+">'
                         r"<figcaption>([^<]+)</figcaption></figure>", html)
    assert len(figures) == html.count("<img") == 4
    for alt, w, h, caption in figures:
        assert len(alt) > 60 and len(caption) > 60 and int(w) > 300 and int(h) > 200, alt
    headline = figures[0]
    assert "3 pairs (alpha + beta: RMS 0.0" in headline[0] and "Paper (GPT-2 small" in headline[3]


def test_numbers_read_alike_ci_lighter_and_changes_coloured(run):
    html = (run / "report.html").read_text(encoding="utf-8")
    t3 = html[html.index("<h2>Table 3"):html.index("<h2>Table 4")]
    ppl = re.findall(r"<td><span class=iv>(\d+\.\d+) <span class=ci>\[(\d+\.\d+), (\d+\.\d+)\]</span></span></td>", t3)
    assert ppl and all(len(m.replace(".", "")) == 4 and all(len(x.split(".")[1]) == len(m.split(".")[1]) for x in (lo, hi))
                       for m, lo, hi in ppl), ppl  # 4 significant digits, the interval with the mean's decimals
    changes = re.findall(r'<span class="chg (\w+)" title="[^"]+"><span class=iv>([-+]\d+\.\d)% <span class=ci>'
                         r"\[([-+]\d+\.\d), ([-+]\d+\.\d)\]</span></span></span>", html)
    assert len(changes) > 10
    for cls, mean, lo, hi in changes:
        assert cls == ("worse" if float(lo) > 0 else "better" if float(hi) < 0 else "even"), (cls, lo, hi)
    assert {c for c, *_ in changes} >= {"worse", "even"}  # the smoke run has both (an interval across 0 in Table 4)


def test_html_is_self_contained_printable_and_dark_mode_ready(run):
    html = (run / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?(?:data:image/png;base64,|#))""", html)
    assert len(re.findall(r'href="#', html)) > 15
    for banned in ("<script", "<link", "@import", "url(", "@font-face", "<iframe", "<object"):
        assert banned not in html, banned
    assert "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; img-src data:;" in html
    assert "@media print{" in html and "details::details-content{content-visibility:visible" in html
    assert "@media screen and (prefers-color-scheme:dark){:root{" in html


HOSTILE = "<script>x|*y*_z_ [a](b) `c` &amp; #"


def test_user_chosen_names_are_escaped_in_both_formats(run, tmp_path):
    """A domain named like markup: report.md shows it as text (no tag, cell break, emphasis, link or code), report.html
    autoescapes it. Rendered with a CommonMark + GFM-tables parser, the markdown keeps every table's shape."""
    from markdown_it import MarkdownIt

    from lorasum.report.render import write_report

    text = (run / "results.json").read_text(encoding="utf-8").replace("gamma", json.dumps(HOSTILE)[1:-1])
    write_report(tmp_path, json.loads(text))  # as if a run had such a domain (configs refuse the name today)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"(?<!\\)<script", md) and "<script" not in html and "&lt;script&gt;x|*y*_z_ [a](b) `c` &amp;amp; #" in html
    assert "\\<script\\>x\\|\\*y\\*\\_z\\_ [a\\](b) \\`c\\` \\&amp; \\#" in md
    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    for tag in ("<script", "<em>y</em>", "<em>z</em>", "<code>", "<a href"):
        assert tag not in rendered, tag
    assert rendered.count("&lt;script&gt;x|*y*_z_ [a](b) `c` &amp;amp; #") >= 10
    for table in re.findall(r"<table>.*?</table>", rendered, flags=re.S):
        widths = {len(re.findall(r"<t[hd][ >]", row)) for row in re.findall(r"<tr>.*?</tr>", table, flags=re.S)}
        assert len(widths) == 1, table[:300]


def test_markdown_escape_keeps_any_text_literal():
    """Any text through text.md, as a paragraph, a heading or a table cell, parses back to exactly that text."""
    from hypothesis import given, settings, strategies as st
    from markdown_it import MarkdownIt

    from lorasum.report.text import md

    parser = MarkdownIt("commonmark").enable("table")
    chars = st.sampled_from(list("ab_1 .#*-+=>|<`~[]()!:;&\\$'\"{}") + ["é", "λ", "&amp;", "\n"])

    def inline(doc: str) -> list:
        tokens = [t for t in parser.parse(doc) if t.type == "inline"]
        return [c for t in tokens for c in t.children]

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.lists(chars, min_size=1, max_size=24).map("".join).filter(str.strip))
    def check(text):
        want = " ".join(text.split())
        for doc, line in ((md(text, line=True), True), ("## " + md(text), False),
                          (f"| h |\n|---|\n| {md(text)} |", False)):
            children = inline(doc)[-1:] if doc.startswith("|") else inline(doc)
            assert all(c.type == "text" for c in children), (doc, [c.type for c in children])
            assert "".join(c.content for c in children) == want, (doc, line)

    check()


def test_significant_digits_and_change_colours():
    from lorasum.report.text import cell_html, ci, num, pct, tone

    assert [num(x) for x in (170.97, 12.345, 1234.4, 0.51234, None)] == ["171.0", "12.35", "1234", "0.5123", "n/a"]
    assert ci({"mean": 12.345, "ci": [11.9, 1000.0]}) == "12.35 [11.90, 1000.00]"
    assert pct({"mean": -3.21, "ci": [-5.0, -1.04]}) == "-3.2% [-5.0, -1.0]"
    assert 'class="chg better"' in cell_html("-3.2% [-5.0, -1.0]") and 'class="chg even"' in cell_html("+0.1% [-0.2, +0.5]")
    assert 'class="chg worse"' in cell_html("+4.54%") and "chg" not in cell_html("4.5%") and "chg" not in cell_html("0.05")
    assert str(cell_html("<b> [1, 2]")) == "&lt;b&gt; [1, 2]"
    assert [tone(v) for v in ("holds", "does not hold", "cannot be decided here", "summed ≈ merged",
                              "not near-orthogonal", "inconclusive", "FAILED: broken")] == \
        ["yes", "no", "open", "yes", "no", "open", "no"]
