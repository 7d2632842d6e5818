"""The package edges of docs/design.md, checked by import-linter's contracts in pyproject.toml: the contracts
hold on this tree, and a copy of the tree with one forbidden import fails them (so the check can fail)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nanoplane", "gateway", "controlplane", "dataplane", "client", "proto")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def lint_imports_available() -> bool:
    try:
        import importlinter  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not lint_imports_available(), reason="import-linter is in the dev extra")


def test_the_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") == 3, result.stdout


@pytest.fixture
def tree_copy(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize("module, line, contract", [
    ("controlplane/core/scheduler.py", "import dataplane.runner", "Floors"),
    ("controlplane/serving/engine.py", "import torch", "run without torch"),
    ("client/types.py", "from controlplane.config import ControlPlaneConfig", "Floors"),
    ("dataplane/runner.py", "from controlplane.core import sequence", "Floors"),
    ("gateway/openai_protocol.py", "from controlplane.serving import validation", "imports no plane"),
    ("proto/step.py", "import client.types", "Floors"),
])
def test_a_forbidden_import_breaks_a_contract(tree_copy, module, line, contract):
    path = tree_copy / module
    path.write_text(path.read_text() + f"\n{line}  # the violation under test\n")
    result = lint_imports(tree_copy)
    assert result.returncode != 0, result.stdout
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(contract in row for row in broken), result.stdout
