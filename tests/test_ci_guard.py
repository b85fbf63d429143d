"""Under CI=true a skip is a failure unless tests/conftest.py allows its reason (CI_ALLOWED_SKIPS); outside CI
skips stay skips. Run on a probe suite in a subprocess that uses this suite's hook."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
import pytest

def test_unexpected():
    pytest.skip("no network to PyPI")

def test_allowed():
    pytest.skip("wandb is installed")

@pytest.mark.skipif(True, reason="UPCYCLE_T4_PYTHON (transformers 4.57) not set")
def test_t4():
    pass
'''


def _run(folder: Path, ci: str) -> str:
    env = {**os.environ, "CI": ci, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o", "addopts=",
                          str(folder)], capture_output=True, text=True, cwd=folder, env=env, timeout=300)
    return res.stdout.strip().splitlines()[-1]


def test_ci_fails_every_skip_it_does_not_allow(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_runtest_makereport  # noqa: F401\n")
    (tmp_path / "test_probe.py").write_text(PROBE)
    assert _run(tmp_path, "").startswith("3 skipped")
    summary = _run(tmp_path, "true")
    # the unexpected skip fails, the missing transformers 4.57 interpreter errors at setup, the allowed one skips
    assert "1 failed" in summary and "1 skipped" in summary and "1 error" in summary
