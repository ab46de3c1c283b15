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


def test_json_errors_are_json_on_stdout(tmp_path):
    from tests.hardening.conftest import cli

    result = cli("inspect", tmp_path / "missing", "--json")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document["code"] == 2 and "missing" in document["error"]
    assert cli("inspect", tmp_path / "missing").stdout == ""  # without --json: stderr only


def test_diff_says_what_it_compared(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from tests.hardening.conftest import cli

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors = load_file(EXAMPLES / "tiny-llama" / "model.safetensors")
    save_file(tensors, a)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + torch.ones(
        1, dtype=torch.bfloat16)
    save_file(tensors, b)
    small = cli("diff", a, b)  # small enough: values compared by default
    assert small.exit_code == 1 and "model.norm.weight" in small.stdout  # as the files say
    keys_only = cli("diff", a, b, "--no-values")
    assert keys_only.exit_code == 0
    assert "values not compared (not asked for: use --values)" in keys_only.stdout
    assert "identical" not in keys_only.stdout


def test_one_shard_of_a_set_is_named_as_such(tmp_path):
    from tests.hardening.conftest import assert_one_line_error, cli

    out = tmp_path / "sharded"
    convert_checkpoint(EXAMPLES / "tiny-llama", out, to="hf", max_shard_size="100KB")
    shard = sorted(out.glob("model-*-of-*.safetensors"))[1]
    assert_one_line_error(cli("inspect", shard), "is shard 2 of", "model.safetensors.index.json")


def test_messages_name_flags_not_python_parameters(tmp_path):
    import re

    from tests.hardening.conftest import cli

    llama, clip = EXAMPLES / "tiny-llama", EXAMPLES / "tiny-clip-vision"
    assert cli("fuse", clip, llama, "-o", tmp_path / "out").exit_code == 0
    errors = [cli("fuse", clip, llama, "-o", tmp_path / "out"),  # exists: needs --overwrite
              cli("diff", llama, llama, "--max-lines", "0"),
              cli("diff", llama, llama, "--atol", "-1")]
    for result, flag in zip(errors, ("--overwrite", "--max-lines", "--atol"), strict=True):
        assert result.exit_code == 2 and flag in result.stderr, result.stderr
        python = r"\b\w+=(True|False|None)\b|max_lines|(?<!-)\batol must"
        assert not re.search(python, result.stderr), result.stderr


def test_convert_of_a_fused_checkpoint_to_another_format_names_every_one_it_takes(
        fused_example, tmp_path):
    done = subprocess.run([sys.executable, "-m", "fusesurgery", "convert", str(fused_example),
                           "--to", "meta", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and "meta" in line
    assert all(target in line for target in ("native", "mllama", "transformers"))
    assert not (tmp_path / "out").exists()
