"""The one rule for every folder a command writes: absent or empty (hidden names count), or lorasum's own output of
that kind. A folder holding anything lorasum did not write there is refused, with or without --overwrite, so
--overwrite only ever replaces what lorasum made, and a rerun of a resumable command continues only in its own
folder."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LorasumError
from .files import check_out_path, is_temp_name


@dataclass(frozen=True)
class OutKind:
    """What lorasum writes in one kind of output folder, so a folder of that kind can be told from anyone else's."""

    what: str  # "adapter folder", named in messages
    names: frozenset[str] | None  # every entry lorasum writes there (None: any; the marker alone identifies it)
    marker: str | None = None  # a file only lorasum writes there: without it the folder is not lorasum's
    resumes: bool = False  # a rerun continues in it; otherwise a finished one is replaced only with --overwrite
    inner: dict[str, OutKind] = field(default_factory=dict)  # sub-folders lorasum writes, each of its own kind


ADAPTER = OutKind("adapter", frozenset({"adapter_config.json", "adapter_model.safetensors", "lorasum.json",
                                        "README.md"}), marker="lorasum.json")  # README.md: PEFT's model card
MERGED = OutKind("merged model", None, marker="lorasum-merge.json")
TUNE = OutKind("tuning study", frozenset({"best.json", "trials.csv", "summary.json", "summary.md", "history.png",
                                          "importance.png", "space.yaml", "study.db", "study.db.lock",
                                          "study.journal", "study.journal.lock"}), resumes=True)
WEIGHT_SEARCH = OutKind("weight search", frozenset({"best.json", "study.db", "study.db.lock", "adapter"}),
                        resumes=True, inner={"adapter": ADAPTER})
SIMILARITY_MATRIX = OutKind("similarity matrix", frozenset({"matrix.csv", "pairs.csv", "heatmap.png"}))


def foreign_entry(folder: Path, kind: OutKind) -> str | None:
    """The first entry below `folder` (as a relative path) that lorasum did not write there as output of `kind`:
    a name outside the kind's, a symlink, or any entry at all when the kind's marker is missing. None: all lorasum's."""
    names = sorted(os.listdir(folder))
    plain = [n for n in names if not is_temp_name(n)]
    if kind.marker is not None and not (kind.marker in names and (folder / kind.marker).is_file()
                                        and not (folder / kind.marker).is_symlink()):
        return plain[0] if plain else None
    for name in names:
        path = folder / name
        if is_temp_name(name):  # an in-flight write's name: recovery removes it (or, if a symlink, ignores it)
            continue
        if path.is_symlink():
            return name
        if kind.names is not None and name not in kind.names:
            return name
        if name in kind.inner:
            if not path.is_dir():
                return name
            inside = foreign_entry(path, kind.inner[name])
            if inside is not None:
                return f"{name}/{inside}"
    return None


def check_out_dir(path: str | os.PathLike, kind: OutKind, overwrite: bool | None = None,
                  flag: str = "--out") -> Path:
    """`flag`'s folder before any work: nameable, not a symlink, and absent, empty, or lorasum's own `kind` of
    output (a finished one that does not resume only with `overwrite`; None: the command has no --overwrite)."""
    out = check_out_path(path, flag)
    if out.is_symlink():
        raise LorasumError(f"{flag} {out} is a symbolic link; name the folder itself")
    if not out.is_dir() or not os.listdir(out):
        return out
    foreign = foreign_entry(out, kind)
    if foreign is not None:
        hint = " (--overwrite replaces only lorasum's own output)" if overwrite is not None else ""
        raise LorasumError(f"{flag} {out} exists and is not empty: it holds '{foreign}', which lorasum did not "
                           f"write there; choose a new folder or move it away{hint}")
    if kind.resumes or overwrite:
        return out
    fix = "choose a new folder, or pass --overwrite to replace it" if overwrite is not None else \
        "choose a new folder or remove it"
    raise LorasumError(f"{flag} {out} exists and is not empty (it holds a finished {kind.what}); {fix}")
