"""CI turns a skipped test into a failed one: what the README's set-up installs must be tested."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 failed"), ("", "1 skipped")])
def test_a_skip_fails_under_ci(tmp_path, ci, outcome):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skipping.py").write_text("import pytest\n\ndef test_it():\n    pytest.skip('no chromium')\n")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "CI": ci}, cwd=tmp_path,
    )
    assert outcome in run.stdout, run.stdout
    if ci:
        assert "skipped where the README's set-up should make it run" in run.stdout and "no chromium" in run.stdout
