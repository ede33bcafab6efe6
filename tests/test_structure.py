"""The package's structure: no import cycle anywhere in dvsft_kernels, and no `_private` name
imported from another module (module-private helpers stay in their module; what is shared is public)."""

from __future__ import annotations

import ast
from pathlib import Path

import dvsft_kernels
from tests.import_graph import import_cycles

ROOT = Path(dvsft_kernels.__file__).parent
REPO = ROOT.parent


def test_no_import_cycle_in_the_package():
    assert import_cycles(ROOT, "dvsft_kernels") == []


def _private_imports(paths) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in
                                                     ("dvsft_kernels", "benchmarks", "tests")):
                found += [f"{path.relative_to(REPO)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_name_imported_across_modules():
    paths = [*ROOT.rglob("*.py"), *(REPO / "benchmarks").glob("*.py"), *(REPO / "examples").glob("*.py")]
    assert _private_imports(paths) == []


def test_private_import_check_finds_one(tmp_path):
    (tmp_path / "m.py").write_text("from dvsft_kernels.ops.options import _is_number\nfrom .x import ok\n")
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        assert _private_imports([tmp_path / "m.py"]) == ["m.py:1 _is_number"]
    finally:
        REPO = saved
