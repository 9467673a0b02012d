"""What a report section holds: small typed blocks that both templates (report.md, report.html) know how to draw.

Adding a kind of block is one class here, one line in BLOCK_KINDS and one macro of that name in each template.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Paragraph:
    """Running text; `**bold**` in markdown, plain in HTML."""

    text: str
    kind = "paragraph"


@dataclass(frozen=True)
class Note:
    """A one-line remark under a heading (why a table is absent or incomplete); set in italics."""

    text: str
    kind = "note"


@dataclass(frozen=True)
class Table:
    """A table of strings with a caption saying how to read it."""

    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    kind = "table"


@dataclass(frozen=True)
class Figures:
    """Figures by name: `figures/<name>.png` beside report.md, embedded in report.html."""

    names: tuple[str, ...]
    kind = "figures"


Block = Paragraph | Note | Table | Figures

BLOCK_KINDS: dict[str, type] = {cls.kind: cls for cls in (Paragraph, Note, Table, Figures)}


@dataclass(frozen=True)
class Section:
    heading: str
    blocks: list = field(default_factory=list)
