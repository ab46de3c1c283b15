"""Command-line details found by trying the tool as a new user."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fusesurgery.write import convert_checkpoint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_convert_reports_progress_against_the_known_total(tmp_path):
    seen = []
    convert_checkpoint(EXAMPLES / "tiny-llama", tmp_path / "out",
                       on_progress=lambda done, total: seen.append((done, total)))
    total = seen[-1][1]
    assert total > 0 and seen[-1] == (total, total)
    assert all(t == total for _, t in seen) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_convert_carries_side_files_and_keeps_the_hf_config_fields(tmp_path):
    out = tmp_path / "hf"
    convert_checkpoint(EXAMPLES / "tiny-llama", out, to="hf")
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (EXAMPLES / "tiny-llama" / name).read_bytes()
    source = json.loads((EXAMPLES / "tiny-llama" / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        assert written[key] == source[key]


def test_no_stray_blank_line_on_stderr(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fusesurgery", "convert", str(EXAMPLES / "tiny-llama"), "-o",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\n\n" not in "\n" + result.stderr and not result.stderr.startswith("\n")
