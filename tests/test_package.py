"""What the deployed zip carries: the app alone. `.funcignore` (gitignore patterns) leaves out
the dev kit, the simulators, the test and benchmark suites; and nothing that is shipped imports
them, so the package works without them."""

from __future__ import annotations

import ast
import fnmatch
import re
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


def _checked_hash_pyc(source: Path) -> bool:
    """Whether `source` has a checked-hash .pyc of this Python, made from its current text."""
    import importlib.util

    cached = Path(importlib.util.cache_from_source(str(source)))
    if not cached.is_file():
        return False
    header = cached.read_bytes()[:16]
    flags = int.from_bytes(header[4:8], "little")
    return (
        header[:4] == importlib.util.MAGIC_NUMBER
        and flags == 0b11  # hash-based, checked against the source on import
        and header[8:16] == importlib.util.source_hash(source.read_bytes())
    )


def test_the_package_carries_the_app_compiled(tmp_path):
    """The package runs from a read-only mount, where Python cannot keep what it compiles:
    the prepackage hook byte-compiles every shipped module, and .funcignore lets the .pyc in.
    The cold-start benchmark compiles the app with the same arguments."""
    import shutil
    import sys

    from bench.cold_start import PACKAGE_BYTECODE

    hook = ROOT / "infra" / "hooks" / "prepackage.sh"
    assert "python3 " + " ".join(PACKAGE_BYTECODE) in hook.read_text()
    runtime = re.search(r"name: 'python'\s+version: '([0-9.]+)'", _text("infra/modules/app.bicep"))
    assert runtime is not None
    assert f"want={runtime.group(1)}\n" in hook.read_text()
    modules = [path for path in shipped() if path.endswith(".py")]
    for path in [*modules, "infra/hooks/prepackage.sh"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, tmp_path / path)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}  # python3: this Python
    done = subprocess.run(
        ["sh", str(tmp_path / "infra/hooks/prepackage.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    compiled = [
        path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("__pycache__/*.pyc")
    ]
    if f"{sys.version_info.major}.{sys.version_info.minor}" != runtime.group(1):
        assert "not byte-compiling" in done.stderr
        assert compiled == []
        return
    missing = [path for path in modules if not _checked_hash_pyc(tmp_path / path)]
    assert missing == []
    assert len(compiled) == len(modules)
    patterns = _patterns()
    assert [path for path in compiled if _ignored(path, patterns)] == []


def _text(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8")
