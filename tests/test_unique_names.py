"""pytest imports test files without packages by their base name: two test files with one name break collection."""

from __future__ import annotations

import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_test_files_have_unique_base_names():
    files = [p for folder in ("tests", "benchmarks") for p in (ROOT / folder).rglob("*.py") if p.name != "__init__.py"]
    by_name = collections.defaultdict(list)
    for path in files:
        by_name[path.name].append(str(path.relative_to(ROOT)))
    repeated = {name: paths for name, paths in by_name.items() if len(paths) > 1 and name != "conftest.py"}
    assert not repeated, f"test modules that share a base name (rename one): {repeated}"
