"""The one reader of YAML files (experiment configs, `--space`): bounded before anything is built from them.

YAML aliases let a 500-byte file stand for a tree of billions of nodes (an "alias bomb"): PyYAML builds it as
shared references, cheaply, but everything that later walks it (validation, a message quoting it, `asdict`, the
config hash) pays for every expanded node. So the composed node graph is measured first, each alias counted as the
whole subtree it stands for, and a file over the budget is refused before any value is constructed.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

from .errors import LorasumError
from .files import stat_or_refuse

MAX_YAML_BYTES = 1 << 20  # a config or space is a few KiB; 1 MiB leaves room for long lists of domains
MAX_YAML_NODES = 100_000  # scalars, lists and mappings after every alias is expanded
MAX_YAML_DEPTH = 100  # nesting of lists and mappings; configs nest three levels


def _budget(root: yaml.Node, where: str, fix: str) -> None:
    """Refuse a node graph whose expansion exceeds MAX_YAML_NODES or MAX_YAML_DEPTH, or that holds itself."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise LorasumError(f"{where}: YAML nested more than {MAX_YAML_DEPTH} levels deep; {fix}")
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise LorasumError(f"{where}: a YAML alias refers to a node that contains it; {fix}")
        open_.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [x for pair in node.value for x in pair]
        else:
            children = []
        for child in children:
            n += size(child, depth + 1)
            if n > MAX_YAML_NODES:
                raise LorasumError(f"{where}: YAML expands to more than {MAX_YAML_NODES} values (aliases counted "
                                   f"in full); write the values out, or fewer of them; {fix}")
        open_.discard(key)
        sizes[key] = n
        return n

    size(root, 0)


def parse_yaml(text: str, where: str, fix: str) -> Any:
    """Parse YAML text within the budgets; any refusal is one LorasumError naming `where` and ending with `fix`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _budget(node, where, fix)
        return loader.construct_document(node)
    except RecursionError:
        raise LorasumError(f"{where}: YAML nested too deeply to read; {fix}") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer beyond the interpreter's digit limit
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorasumError(f"{where}: not valid YAML ({first[:120]}); {fix}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike, what: str, fix: str) -> Any:
    """A YAML file's value: a regular, readable UTF-8 file of at most MAX_YAML_BYTES, parsed by `parse_yaml`;
    errors name `what` and the path (a FIFO or device is refused, never opened, so it cannot hang the read)."""
    where = f"{what} {path}"
    st = stat_or_refuse(path, f"{where} not found; check the path", f"cannot read {where}: {{strerror}}; {fix}")
    if stat.S_ISDIR(st.st_mode):
        raise LorasumError(f"{where} is a folder, not a YAML file; {fix}")
    if not stat.S_ISREG(st.st_mode):
        raise LorasumError(f"{where} is not a regular file (a pipe or device); pass a YAML file")
    if st.st_size > MAX_YAML_BYTES:
        raise LorasumError(f"{where} is {st.st_size} bytes; YAML files are limited to {MAX_YAML_BYTES} bytes; {fix}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise LorasumError(f"cannot read {where}: {e.strerror}; {fix}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise LorasumError(f"{where} is over {MAX_YAML_BYTES} bytes; YAML files are limited to that; {fix}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LorasumError(f"{where} is not UTF-8 text (byte {e.start}); {fix}") from None
    return parse_yaml(text, where, fix)
