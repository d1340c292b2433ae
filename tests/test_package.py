"""What the deployed zip carries: the app alone. `.funcignore` (gitignore patterns) leaves out
the dev kit, the simulators, the test and benchmark suites; and nothing that is shipped imports
them, so the package works without them."""

from __future__ import annotations

import ast
import fnmatch
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLING = ("devkit", "armsim", "chaos", "bench", "tests")


def _patterns() -> list[str]:
    lines = (ROOT / ".funcignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """gitignore's rule for patterns without a slash: any path component may match."""
    parts = path.split("/")
    for pattern in patterns:
        if "/" in pattern.strip("/"):
            if fnmatch.fnmatch(path, pattern.strip("/")) or path.startswith(pattern.strip("/")):
                return True
        elif any(fnmatch.fnmatch(part, pattern.rstrip("/")) for part in parts):
            return True
    return False


def shipped() -> list[str]:
    """The tracked files the Functions package would carry."""
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    patterns = _patterns()
    return [path for path in listed if (ROOT / path).is_file() and not _ignored(path, patterns)]


def test_the_package_carries_the_app_and_no_tooling():
    files = shipped()
    assert "function_app.py" in files
    assert "host.json" in files
    assert "requirements.txt" in files
    assert any(path.startswith("rebalancer/") for path in files)
    carried = sorted({path.split("/")[0] for path in files if path.split("/")[0] in TOOLING})
    assert carried == [], f".funcignore lets {carried} into the package"


def test_nothing_shipped_imports_the_tooling():
    """An import of the dev kit or a simulator from shipped code would fail in Azure."""
    problems = []
    for path in shipped():
        if not path.endswith(".py"):
            continue
        tree = ast.parse((ROOT / path).read_text(), filename=path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in TOOLING:
                    problems.append(f"{path}:{node.lineno} imports {name}")
    assert problems == []
