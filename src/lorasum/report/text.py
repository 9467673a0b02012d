"""How numbers and text are written in the report: significant digits, intervals, signed changes, and the two
escapes (markdown for report.md; report.html is autoescaped by jinja2, and only this module's cell markup adds tags).
"""

from __future__ import annotations

import math
import re

from markupsafe import Markup, escape

SIG = 4  # significant digits of a perplexity (and anything else of unknown scale)


def decimals(x: float, sig: int = SIG) -> int:
    """Decimals that show `x` with `sig` significant digits (none for large numbers, 0 for non-finite ones)."""
    if not math.isfinite(x) or x == 0:
        return sig - 1 if x == 0 else 0
    return max(0, sig - 1 - math.floor(math.log10(abs(x))))


def num(x, sig: int = SIG) -> str:
    """`x` with `sig` significant digits (171.0, 12.35, 1235), or "n/a"."""
    return "n/a" if x is None else f"{x:.{decimals(x, sig)}f}"


def ci(x: dict, sig: int = SIG) -> str:
    """`mean [lo, hi]` of an interval, all three with the mean's decimals: `171.0 [169.6, 172.4]`."""
    d = decimals(x["mean"], sig)
    return f"{x['mean']:.{d}f} [{x['ci'][0]:.{d}f}, {x['ci'][1]:.{d}f}]"


def pct(x: dict) -> str:
    """A signed change in percent with its interval: `+16.9% [+16.0, +17.7]`."""
    return f"{x['mean']:+.1f}% [{x['ci'][0]:+.1f}, {x['ci'][1]:+.1f}]"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


# --- verdicts --------------------------------------------------------------------------------------------------
_AGREES = {"holds", "summed ≈ merged", "near-orthogonal", "restores", "passed", "positive relation"}
_DISAGREES = {"does not hold", "summed worse than merged", "not near-orthogonal", "does not restore",
              "negative relation"}


def tone(verdict: str) -> str:
    """'yes' where a verdict agrees with the paper's claim, 'no' where it contradicts it (or the run is broken),
    'open' where nothing is decided."""
    v = verdict.strip()
    if v in _AGREES:
        return "yes"
    if v in _DISAGREES or v.startswith("FAILED"):
        return "no"
    return "open"


# --- markdown --------------------------------------------------------------------------------------------------
_MD_CHARS = re.compile(r"[\\`*$~|<>]")
_MD_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")  # `_` unless between two letters or digits (snake_case)
_MD_LINK = re.compile(r"\](?=[(\[:])")  # `](`, `][`, `]:` would open a link, an image or a reference
_MD_ENTITY = re.compile(r"&(?=#?\w+;)")
_MD_HASH = re.compile(r"(?:(?<=\s)|^)#")  # `#` after a space could close a heading
_MD_LINE_START = re.compile(r"^(\d*)([#>+=-]|(?<=\d)[.)](?=\s|$))")


def md(text, line: bool = False) -> str:
    """`text` as literal markdown (GitHub-flavoured): one line, no emphasis, code, link, HTML tag, entity, table
    cell break or math of its own; with `line` (text that starts a line) no block marker (`#`, `-`, `1.`) either.
    Letters, digits, snake_case names and `name[a=b]` stay readable."""
    s = " ".join(str(text).split())
    s = _MD_CHARS.sub(lambda m: "\\" + m.group(), s)
    s = _MD_UNDERSCORE.sub(r"\\_", s)
    s = _MD_LINK.sub(r"\\]", s)
    s = _MD_ENTITY.sub(r"\\&", s)
    s = _MD_HASH.sub(r"\\#", s)
    return _MD_LINE_START.sub(lambda m: m.group(1) + "\\" + m.group(2), s) if line else s


# --- HTML table cells ------------------------------------------------------------------------------------------
_NUM = r"[-+−]?\d+(?:\.\d+)?"
_WITH_CI = re.compile(rf"^({_NUM}%?) (\[{_NUM}, {_NUM}\])$")
_CHANGE = re.compile(rf"^([-+−]\d+(?:\.\d+)?)%(?: \[({_NUM}), ({_NUM})\])?$")


def _f(s: str) -> float:
    return float(s.replace("−", "-"))


def cell_html(text) -> Markup:
    """One table cell for report.html, escaped: an interval `x [lo, hi]` gets its bracket in a lighter style; a
    signed change in perplexity vs merged (`+16.9% [+16.0, +17.7]`) is coloured 'worse' where it (its whole
    interval) is above 0, 'better' where below 0."""
    s = str(text)
    change = _CHANGE.match(s)
    m = _WITH_CI.match(s)
    body = Markup("<span class=iv>{} <span class=ci>{}</span></span>").format(m.group(1), m.group(2)) if m else escape(s)
    if not change:
        return body
    lo, hi = (_f(change.group(2)), _f(change.group(3))) if change.group(2) else (_f(change.group(1)),) * 2
    cls = "worse" if lo > 0 else "better" if hi < 0 else "even"
    what = {"worse": "higher perplexity than merged", "better": "lower perplexity than merged",
            "even": "interval includes 0"}[cls]
    return Markup('<span class="chg {}" title="{}">{}</span>').format(cls, what, body)


def slug(text: str, taken: set[str]) -> str:
    """A unique id for an anchor: lowercase words joined by '-' (`Table 3 — pairs` -> `table-3-pairs`)."""
    base = "-".join(re.findall(r"[^\W_]+", text.lower(), flags=re.UNICODE))[:48].strip("-") or "section"
    out, i = base, 2
    while out in taken:
        out, i = f"{base}-{i}", i + 1
    taken.add(out)
    return out
