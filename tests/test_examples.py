"""The examples run, and leave the bundled checkpoints as they were."""

import subprocess
import sys
from pathlib import Path

from tests.hardening.conftest import snapshot

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_lifecycle_example(tmp_path):
    before = snapshot(EXAMPLES)
    result = subprocess.run([sys.executable, str(EXAMPLES / "lifecycle.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no longer an identity" in result.stdout
    assert "every tensor bitwise equal" in result.stdout
    assert snapshot(EXAMPLES) == before
