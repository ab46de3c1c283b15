"""Class 5: what a config states is bounded by what is needed. A decoder stating 10**12
positions fuses, validates and loads (its RoPE table grows with the positions used); every
argument is checked before any long work, and refused in one line naming it."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

import fusesurgery
from fusesurgery.errors import CheckpointError, ConfigError, WriteError
from tests.hardening.conftest import EXAMPLES, assert_one_line_error, cli, edit_config
from tests.hardening.test_no_hangs import bounded


def test_a_decoder_stating_a_trillion_positions_validates(clip, llama, tmp_path):
    """(With the largest seed validate takes: 2**63 - 1.)"""
    edit_config(llama, max_position_embeddings=10**12)
    out = tmp_path / "fused"
    with bounded(120):
        fusesurgery.fuse(clip, llama, out, every=2)
        result = cli("validate", out, "--against", llama, "--seed", 2**63 - 1)
    assert result.exit_code == 0, result.output
    assert "bit for bit" in result.stdout
    model = fusesurgery.load_fused(out)
    assert model.decoder.max_seq_len == 10**12
    assert sum(buffer.numel() for buffer in model.buffers()) < 10**6


EXAMPLE_CLIP = EXAMPLES / "tiny-clip-vision"
EXAMPLE_LLAMA = EXAMPLES / "tiny-llama"


@pytest.mark.parametrize(("arguments", "fragment"), [
    ({"layers": "1,3"}, "layers must be a list of decoder layer indices (ints), not '1,3' (str)"),
    ({"layers": [1.0, 3.0]}, "layers must be a list of decoder layer indices"),
    ({"every": "2"}, "every must be an integer, not '2' (str)"),
    ({"every": True}, "every must be an integer, not True (bool)"),
    ({"encoder_layer": "last"}, "encoder_layer must be a hidden-layer index"),
    ({"new_tokens": "<|image|>"}, "new_tokens must be a list of strings, not '<|image|>'"),
    ({"seed": 1.5}, "seed must be an integer from 0 to 4294967295"),
    ({"seed": -1}, "seed must be an integer from 0 to 4294967295"),
    ({"seed": 2**32}, "not 4294967296 (int)"),
    ({"seed": 2**64}, "not 18446744073709551616 (int)"),
])
def test_fuse_arguments_of_the_wrong_type_or_range_are_named(tmp_path, arguments, fragment):
    with pytest.raises(ConfigError) as error:
        fusesurgery.fuse(EXAMPLE_CLIP, EXAMPLE_LLAMA, tmp_path / "out", **arguments)
    assert fragment in str(error.value)
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_fuses(tmp_path):
    result = fusesurgery.fuse(EXAMPLE_CLIP, EXAMPLE_LLAMA, tmp_path / "out", every=2,
                              seed=2**32 - 1)
    assert result.config.seed == 2**32 - 1


@pytest.mark.parametrize("seed", ["-1", "4294967296", "18446744073709551616"])
def test_a_seed_out_of_range_is_one_line_on_the_command_line(tmp_path, seed):
    assert_one_line_error(cli("fuse", EXAMPLE_CLIP, EXAMPLE_LLAMA, "-o", tmp_path / "out",
                              "--seed", seed), "seed must be an integer from 0 to", seed)


@pytest.mark.parametrize("layers", [",".join(["1"] * 30000),
                                    ",".join(map(str, range(30000))) + "x"])
def test_a_huge_layers_list_gives_a_short_error_line(tmp_path, layers):
    line = assert_one_line_error(cli("fuse", EXAMPLE_CLIP, EXAMPLE_LLAMA, "-o", tmp_path / "out",
                                     "--layers", layers))
    assert len(line) < 300, len(line)


@pytest.mark.parametrize(("arguments", "fragment"), [
    ({"seed": -1}, "seed must be an integer from 0 to 9223372036854775807, not -1"),
    ({"seed": 2**63}, "not 9223372036854775808"),
    ({"seed": 1.0}, "not 1.0 (float)"),
    ({"seq_len": "8"}, "seq_len must be an integer"),
    ({"batch": 0}, "batch must be an integer from 1"),
])
def test_validate_arguments_are_checked(fused_example, arguments, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        fusesurgery.validate(fused_example, **arguments)


@pytest.mark.parametrize(("device", "fragment"), [
    ("tpu", "device: unknown device 'tpu'"), ("cuda:x", "unknown device 'cuda:x'"),
    (0, "device must be a device name such as 'cpu' or 'cuda:0', not 0 (int)"),
])
def test_load_fused_refuses_a_bad_device_with_its_own_error(fused_example, device, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        fusesurgery.load_fused(fused_example, device=device)


def test_load_fused_refuses_a_flag_that_is_not_a_bool(fused_example):
    with pytest.raises(ConfigError, match="fusion_trainable must be True or False, not 'no'"):
        fusesurgery.load_fused(fused_example, fusion_trainable="no")


def test_a_path_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    bad = Path(os.fsdecode(bytes(tmp_path) + b"/llama\xff"))
    shutil.copytree(EXAMPLE_LLAMA, bad)
    for args in (("inspect", bad), ("fuse", EXAMPLE_CLIP, bad, "-o", tmp_path / "out"),
                 ("convert", bad, "-o", tmp_path / "out"), ("diff", bad, EXAMPLE_LLAMA)):
        assert_one_line_error(cli(*args), "checkpoint path", "llama\\xff is not valid UTF-8")
    out = Path(os.fsdecode(bytes(tmp_path) + b"/out\xfe"))
    assert_one_line_error(cli("fuse", EXAMPLE_CLIP, EXAMPLE_LLAMA, "-o", out),
                          "output path", "out\\xfe is not valid UTF-8")
    assert sorted(os.listdir(tmp_path)) == [os.fsdecode(b"llama\xff")]
    with pytest.raises(CheckpointError, match="not valid UTF-8"):
        fusesurgery.load_decoder(os.fsencode(bad))


def test_push_checks_its_options_before_validating(fused_example):
    result = cli("push", fused_example, "alice/m", "--dry-run", "--base-model", "bad id!!")
    assert_one_line_error(result, "'bad id!!' is not a Hub repo id")
    assert "validating" not in result.stderr


@pytest.mark.parametrize("seed", ["-5", "18446744073709551616"])
def test_a_demo_seed_out_of_range_is_one_error_line(seed):
    result = cli("demo", "--seed", seed)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: seed must be an integer from 0 to 9223372036854775807, not "
                      f"{seed} (int)"], result.stderr
    assert "Traceback" not in result.output and "internal error" not in result.output


def test_push_refuses_a_file_name_that_is_not_utf8(fused_example, tmp_path):
    fused = Path(shutil.copytree(fused_example, tmp_path / "fused"))
    (Path(os.fsdecode(bytes(fused) + b"/notes\xff.txt"))).write_text("x")
    assert_one_line_error(cli("push", fused, "alice/m", "--dry-run", "--quick"),
                          "file name notes\\xff.txt is not valid UTF-8")


def test_a_path_argument_that_is_not_a_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint path must be a str or os.PathLike, "
                                              r"not None \(NoneType\)"):
        fusesurgery.load_fused(None)
    with pytest.raises(WriteError, match=r"output path must be a str or os.PathLike, not 5"):
        fusesurgery.fuse(EXAMPLE_CLIP, EXAMPLE_LLAMA, 5)
