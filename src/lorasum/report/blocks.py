"""What a report section holds: small typed blocks that both templates (report.md, report.html) know how to draw.

Adding a kind of block is one class here, one line in BLOCK_KINDS and one macro of that name in each template.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Paragraph:
    """Running text, drawn as it is (escaped for each format)."""

    text: str
    kind = "paragraph"


@dataclass(frozen=True)
class Note:
    """A one-line remark under a heading (why a table is absent or incomplete, a caution); set in italics."""

    text: str
    kind = "note"


@dataclass(frozen=True)
class Table:
    """A table of strings with a caption saying how to read it.

    `verdicts`: the index of a column of verdicts, drawn as coloured badges in HTML and in bold in markdown.
    `style`: a class name the HTML styles the table by (e.g. "claims"); markdown ignores it.
    """

    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    verdicts: int | None = None
    style: str = ""
    kind = "table"


@dataclass(frozen=True)
class Figures:
    """Figures by name: `figures/<name>.png` beside report.md, embedded in report.html; each with alt text (what
    it shows, for a reader who cannot see it) and a caption (how to read it). Both default to the name."""

    names: tuple[str, ...]
    alts: tuple[str, ...] = ()
    captions: tuple[str, ...] = ()
    kind = "figures"

    def items(self) -> list[tuple[str, str, str]]:
        """(name, alt, caption) of each figure."""
        def at(xs: tuple, i: int, name: str) -> str:
            return xs[i] if i < len(xs) and xs[i] else name.replace("_", " ")
        return [(n, at(self.alts, i, n), at(self.captions, i, n)) for i, n in enumerate(self.names)]


Block = Paragraph | Note | Table | Figures

BLOCK_KINDS: dict[str, type] = {cls.kind: cls for cls in (Paragraph, Note, Table, Figures)}


@dataclass(frozen=True)
class Section:
    """A heading and its blocks. `summary`, when set, is a one-line digest of the section: the section is detail,
    collapsed behind that line (closed by default). `lead`: the answer at the top, its figure beside its table."""

    heading: str
    blocks: list = field(default_factory=list)
    summary: str = ""
    lead: bool = False
