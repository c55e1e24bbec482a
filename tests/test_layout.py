"""What the folder layout promises: only the spool touches SQLite, and only its
schema child imports sqlite-utils."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "edgeagent"


def test_only_the_spool_opens_sqlite_or_runs_sql() -> None:
    outside = []
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "spool"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            sql = node.attr in ("execute", "executemany", "executescript")
            opens = node.attr == "connect" and isinstance(node.value, ast.Name) and node.value.id == "sqlite3"
            if sql or opens:
                outside.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.attr}")
    assert outside == []


def test_only_the_schema_child_imports_sqlite_utils() -> None:
    users = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(name.split(".")[0] == "sqlite_utils" for name in names):
                users.append(str(path.relative_to(REPO)))
    assert users == ["edgeagent/spool/schema.py"]
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, edgeagent.spool, edgeagent.agent; print('sqlite_utils' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert loaded.stdout.strip() == "False"
