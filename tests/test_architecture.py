"""The package layout holds: the import-linter layers contract (cli → study → report | tune → lm → delta → ground
floor), no import loop between any two modules, no escape hatches, and library imports at module level outside
the command line (whose handlers import lazily so `lorasum --help` stays torch-free)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lorasum"


def test_layers_contract_is_kept_and_has_no_escape_hatches():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    (contract,) = cfg["contracts"]
    assert contract["type"] == "layers" and "ignore_imports" not in contract
    assert contract["layers"][:5] == ["lorasum.cli", "lorasum.study", "lorasum.report | lorasum.tune", "lorasum.lm",
                                      "lorasum.delta"]
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import loops."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_loops_anywhere():
    graph = grimp.build_graph("lorasum", cache_dir=None)
    assert len(graph.modules) > 30
    assert _cycles(graph) == []


def test_the_loop_finder_finds_a_loop():
    graph = grimp.build_graph("lorasum", cache_dir=None)
    graph.add_import(importer="lorasum.errors", imported="lorasum.files")  # files imports errors: now a loop
    assert ["lorasum.errors", "lorasum.files"] in _cycles(graph)


def _function_level_imports(path: Path) -> list[str]:
    found = []
    for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [f"{path.relative_to(SRC)}:{n.lineno}" for n in ast.walk(fn)
                      if isinstance(n, ast.ImportFrom) and n.level > 0]
    return found


def test_library_imports_sit_at_module_level_outside_the_cli():
    lazy = [hit for p in sorted(SRC.rglob("*.py")) if "cli" not in p.relative_to(SRC).parts
            for hit in _function_level_imports(p)]
    assert lazy == []


def test_help_does_not_import_torch():
    code = "import sys; from lorasum.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
