"""The house rules a tool can check: the layer contract (import-linter, configured in pyproject.toml)
and the size of functions and classes in parity/."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "parity"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 200
# Declarative tables may run longer: one entry per line, no logic between them.
TABLES = {("parity/cli.py", "parser")}


def lint_imports() -> list[str]:
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]' (README's test command does)")
    return [found, "--no-cache"]


def test_the_layer_contract_holds():
    done = subprocess.run(lint_imports(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_an_upward_import_from_a_rank_module_breaks_the_contract(tmp_path):
    """The contract is live: a copy of the package whose rank side imports the verdict side fails it."""
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "parity", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    planted = copy / "parity" / "rank" / "model.py"
    planted.write_text("import parity.verdict.pair\n" + planted.read_text())
    done = subprocess.run(lint_imports(), cwd=copy, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-2000:]
    assert "parity.rank is not allowed to import parity.verdict" in done.stdout
    assert "parity.rank.model -> parity.verdict.pair" in done.stdout


def oversized() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text(), filename=name)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = MAX_FUNCTION_LINES
            elif isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            else:
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > limit and (name, node.name) not in TABLES:
                found.append(f"{name}:{node.lineno} {node.name} has {lines} lines (at most {limit})")
    return found


def test_no_function_or_class_outgrows_its_limit():
    assert oversized() == []


def test_no_module_imports_itself_back():
    """No import cycle anywhere in parity/, counting imports inside functions (a lazy import cannot hide one)."""
    import grimp

    graph = grimp.build_graph("parity", cache_dir=None)
    cycles = sorted({tuple(sorted((m, imported))) for m in graph.modules
                     for imported in graph.find_modules_directly_imported_by(m)
                     if graph.chain_exists(importer=imported, imported=m)})
    assert cycles == []
