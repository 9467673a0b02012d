"""report.md and a self-contained report.html (figures embedded) from results.json alone, through the jinja2
templates beside this module: autoescaping for the HTML, markdown escaping (text.md) for report.md.

`lorasum report RUN_DIR` re-renders without recomputing anything.
"""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import jinja2

from ..errors import LorasumError
from ..files import atomic_write_bytes, atomic_write_text
from ..jsonfile import content_digest, read_json
from .figures import FIGURES, available
from .overview import run_facts
from .science import speed_section
from .sections import sections
from .text import cell_html, md, slug, tone
from .tuning import tuning_pngs

_TEMPLATES = Path(__file__).with_name("templates")


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header, so the page keeps each figure's box before it is decoded."""
    return struct.unpack(">II", data[16:24]) if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 else (0, 0)


def _env(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=autoescape, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters.update(md=md, md_alt=lambda s: md(s).replace("[", "\\[").replace("]", "\\]"), cell=cell_html,
                       tone=tone, b64=lambda data: base64.b64encode(data).decode(), png_size=_png_size,
                       short=lambda h: h.split(" — ")[0])
    return env


def _ids(secs: list) -> list[str]:
    taken: set[str] = set()
    return [slug(s.heading.split(" — ")[0], taken) for s in secs]


UNSIGNED = "unsigned: results.json carries no digest; it may have been edited"


def render_md(r: dict, unsigned: bool = False) -> str:
    """report.md: the same sections in the same order as report.html, every text markdown-escaped; detail sections
    folded in <details> (GitHub and GitLab draw them collapsed). Deterministic: no wall times. `unsigned` (a
    results.json without its digest) puts the UNSIGNED mark under the title, since nothing vouches for the numbers."""
    return _env(autoescape=False).get_template("report.md.j2").render(
        sections=sections(r), facts=run_facts(r), unsigned=UNSIGNED if unsigned else "")


def render_html(r: dict, pngs: dict[str, bytes], timings: dict | None = None, unsigned: bool = False) -> str:
    """The HTML report; with `timings` (timings.json) also the compute time and the speed section, which report.md
    leaves out. The speed section goes before the first collapsed section (the detail). `unsigned`: as render_md."""
    secs = sections(r)
    extra = speed_section(r, timings) if timings else []
    at = next((i for i, s in enumerate(secs) if s.summary), len(secs))
    secs = secs[:at] + extra + secs[at:]
    return _env(autoescape=True).get_template("report.html.j2").render(
        sections=secs, ids=_ids(secs), pngs=pngs, facts=run_facts(r, timings), unsigned=UNSIGNED if unsigned else "")


def figure_pngs(r: dict) -> dict[str, bytes]:
    """{name: PNG bytes} of every figure the report shows."""
    return {**{name: FIGURES[name](r) for name in available(r)}, **(tuning_pngs(r) if r.get("tuning") else {})}


RESULTS_KEYS = ("schema", "config", "models", "perplexity", "pairs", "compositions", "unlearning", "recipe_check",
                "fit", "data", "provenance", "findings")


def read_results(run_dir: Path) -> dict:
    """RUN_DIR/results.json, refused in one line when it is missing, unreadable, not a lorasum results file, or
    changed since lorasum wrote it (its digest no longer matches: the report renders only what lorasum wrote)."""
    path = run_dir / "results.json"
    fix = (f"regenerate it with `lorasum experiment --config {run_dir / 'config.json'} --out {run_dir}` (finished "
           "jobs are reused)")
    if not path.is_file():
        raise LorasumError(f"{path} not found; run `lorasum experiment --out {run_dir}` first")
    results = read_json(path, "results file", fix, kind=None)
    if not isinstance(results, dict):
        what = f"a JSON {type(results).__name__}, not an object"
    else:
        missing = [k for k in RESULTS_KEYS if k not in results]
        ok_schema = str(results.get("schema")).startswith("lorasum.results/")
        what = f"missing {', '.join(missing)}" if missing else "" if ok_schema else f"schema {results['schema']!r}"
    if what:
        raise LorasumError(f"{path} is not a lorasum results file ({what}); {fix}")
    if "digest" in results and results["digest"] != content_digest({k: v for k, v in results.items()
                                                                     if k != "digest"}):
        raise LorasumError(f"{path} was changed after lorasum wrote it (its digest no longer matches its content); "
                           f"{fix}")
    return results


def _timings(run_dir: Path) -> dict:
    """timings.json of the run (wall times), or {} when it is absent or damaged: it only adds the speed table."""
    if not (run_dir / "timings.json").is_file():
        return {}
    try:
        return read_json(run_dir / "timings.json", "timings file", "it is rewritten by the next run")
    except LorasumError:
        return {}


def write_report(run_dir: str | Path, results: dict | None = None) -> Path:
    """Write figures/*.png, report.md and report.html from results.json (atomic writes).

    Everything is rendered before the first file is written, so a damaged results.json changes nothing.
    """
    run_dir = Path(run_dir)
    legacy = False
    if results is None:
        results = read_results(run_dir)
        legacy = "digest" not in results
    try:  # a file whose digest matches is what lorasum wrote: a failure to render it is a bug (traceback)
        pngs = figure_pngs(results)
        md_text, html = render_md(results, legacy), render_html(results, pngs, _timings(run_dir), legacy)
    except Exception as e:
        if not legacy:
            raise
        raise LorasumError(f"{run_dir / 'results.json'} has no digest (written before lorasum signed its results, "
                           f"so it may have been edited) and does not render ({type(e).__name__}); regenerate it "
                           f"with `lorasum experiment --config {run_dir / 'config.json'} --out {run_dir}`") from None
    if (run_dir / "figures").is_symlink():  # lorasum never makes one: writing through it would land outside the run
        raise LorasumError(f"{run_dir / 'figures'} is a symbolic link, which lorasum never makes; remove it and rerun")
    for name, png in pngs.items():
        atomic_write_bytes(run_dir / "figures" / f"{name}.png", png)
    atomic_write_text(run_dir / "report.md", md_text)
    atomic_write_text(run_dir / "report.html", html)
    return run_dir / "report.html"
