"""Start-up stays cheap: --help, --version, header-only inspect and key-level diff of a
405B-shaped checkpoint never import torch (issue 8, 4.12).

Each case runs the installed console script in a fresh interpreter, which reports on exit
whether torch was imported; the figures themselves are in benchmarks/bench_startup.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusesurgery.config import preset
from fusesurgery.convert import layout_tensor_infos
from fusesurgery.convert.configs import hf_config_dict
from fusesurgery.testing import write_sparse_sharded_safetensors

CONSOLE_SCRIPT = Path(sys.executable).with_name("fusesurgery")

# Runs the console script as `fusesurgery ARGS...` would, then writes {"torch": bool} to the
# file named by FUSESURGERY_TEST_PROBE, whatever way the command exits.
PROBE = """
import json, os, runpy, sys
script, *args = sys.argv[1:]
sys.argv = ["fusesurgery", *args]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(os.environ["FUSESURGERY_TEST_PROBE"], "w") as probe:
        json.dump({"torch": "torch" in sys.modules}, probe)
"""


def run_probed(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    """``(completed process, torch imported?)`` of ``fusesurgery ARGS`` in a fresh process."""
    probe = tmp_path / "probe.json"
    probe.unlink(missing_ok=True)
    environment = {**os.environ, "FUSESURGERY_TEST_PROBE": str(probe), **(env or {})}
    environment.pop("FUSESURGERY_DEBUG", None)
    done = subprocess.run([sys.executable, "-c", PROBE, str(CONSOLE_SCRIPT), *args],
                          capture_output=True, text=True, env=environment, timeout=120)
    return done, json.loads(probe.read_text())["torch"]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    """Two sparse Llama-3.1-405B-shaped HF checkpoints (every header, no data on disk)."""
    config = preset("llama3_1_405b")
    infos = layout_tensor_infos(config, "hf")
    root = tmp_path_factory.mktemp("big")
    out = []
    for name in ("a", "b"):
        write_sparse_sharded_safetensors(root / name, infos)
        (root / name / "config.json").write_text(json.dumps(hf_config_dict(config)))
        out.append(root / name)
    return out[0], out[1]


def test_console_script_exists():
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT}: install the package (pip install -e .)"


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["-V"], ["--version"]], ids=" ".join)
def test_root_help_and_version_do_not_import_torch(tmp_path, args):
    done, torch_imported = run_probed(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert not torch_imported
    if "-V" in args or "--version" in args:
        import fusesurgery

        assert done.stdout.strip() == f"fusesurgery {fusesurgery.__version__}"
    else:
        assert "inspect" in done.stdout and "Usage" in done.stdout


@pytest.mark.parametrize("command", ["fuse", "validate", "unfuse", "inspect", "diff", "convert",
                                     "demo", "generate"])
def test_command_help_does_not_import_torch(tmp_path, command):
    done, torch_imported = run_probed(tmp_path, command, "--help")
    assert done.returncode == 0, done.stderr
    assert f"fusesurgery {command}" in done.stdout
    assert not torch_imported


def test_header_inspect_of_405b_does_not_import_torch(tmp_path, big):
    a, _ = big
    done, torch_imported = run_probed(tmp_path, "inspect", str(a))
    assert done.returncode == 0, done.stderr
    assert "lm_head.weight" in done.stdout and "[128256, 16384]" in done.stdout
    assert not torch_imported
    done, torch_imported = run_probed(tmp_path, "inspect", str(a), "--json", "--keys")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["config"]["num_layers"] == 126 and report["num_tensors"] == 1137
    assert not torch_imported


def test_key_level_diff_of_405b_does_not_import_torch(tmp_path, big):
    a, b = big
    done, torch_imported = run_probed(tmp_path, "diff", str(a), str(b))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "values not compared" in done.stdout
    assert not torch_imported


def test_the_probe_sees_torch_when_a_command_needs_it(tmp_path):
    # the probe must be able to fail: a command that builds models imports torch
    done, torch_imported = run_probed(tmp_path, "demo", "--json")
    assert done.returncode == 0, done.stderr
    assert torch_imported


def test_completion_does_not_import_torch(tmp_path):
    done, torch_imported = run_probed(
        tmp_path, env={"_FUSESURGERY_COMPLETE": "complete_bash",
                       "COMP_WORDS": "fusesurgery ins", "COMP_CWORD": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["inspect"]
    assert not torch_imported


def test_import_fusesurgery_is_lazy_and_complete():
    code = """
import sys
import fusesurgery
assert "torch" not in sys.modules, "import fusesurgery imported torch"
from fusesurgery import load_fused, validate, FuseOptions, __version__
import fusesurgery.validate.checks  # the subpackage named like the function
assert fusesurgery.validate is validate and callable(validate), fusesurgery.validate
assert validate.__name__ == "validate_fused"
for name in fusesurgery.__all__:
    assert getattr(fusesurgery, name) is not None, name
assert set(fusesurgery.__all__) <= set(dir(fusesurgery))
try:
    fusesurgery.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("no AttributeError")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_headers_read_without_torch(tmp_path):
    # the writer side may import torch: write the file here, read it in a fresh process
    import torch

    from fusesurgery.io.tensor_info import TensorInfo
    from fusesurgery.testing import write_sparse_safetensors

    path = tmp_path / "m.safetensors"
    write_sparse_safetensors(path, [TensorInfo("w", (3, 4), torch.bfloat16),
                                    TensorInfo("i", (5,), torch.int64)])
    code = f"""
import sys
from fusesurgery.io import open_checkpoint
with open_checkpoint({str(path)!r}) as source:
    infos = source.infos()
assert "torch" not in sys.modules, "reading a header imported torch"
w, i = infos["w"], infos["i"]
assert (w.dtype_name, w.nbytes, w.is_floating_point) == ("bf16", 24, True)
assert (i.dtype_name, i.nbytes, i.is_floating_point) == ("i64", 40, False)
import torch
assert (w.dtype, i.dtype) == (torch.bfloat16, torch.int64)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_tensor_info_is_one_value_however_its_dtype_was_given():
    import torch

    from fusesurgery.io.tensor_info import SAFETENSORS_DTYPES, TensorInfo

    for code, dtype in SAFETENSORS_DTYPES.items():
        by_name, by_dtype = TensorInfo("x", (2, 3), code), TensorInfo("x", (2, 3), dtype)
        assert by_name == by_dtype and hash(by_name) == hash(by_dtype)
        assert by_name.dtype is dtype and by_name.nbytes == 6 * dtype.itemsize
        assert by_name.is_floating_point == dtype.is_floating_point
    odd = TensorInfo("c", (2,), torch.complex64)  # no safetensors name: kept as torch's
    assert (odd.dtype, odd.dtype_name, odd.nbytes) == (torch.complex64, "complex64", 16)
    with pytest.raises(ValueError, match="unknown safetensors dtype"):
        TensorInfo("x", (1,), "bf16")


def test_fuse_help_default_matches_the_library():
    from fusesurgery.cli import fuse as fuse_cli
    from fusesurgery.surgery.fuse_plan import DEFAULT_EVERY

    assert fuse_cli.DEFAULT_EVERY == DEFAULT_EVERY


def test_inspect_and_diff_of_a_fused_directory_do_not_import_torch(tmp_path, fused_example):
    # issue 19: the gates are read from the file's bytes, the rest is metadata
    done, torch_imported = run_probed(tmp_path, "inspect", str(fused_example))
    assert done.returncode == 0, done.stderr
    assert "identity: all gates 0 (4 gates)" in done.stdout
    assert not torch_imported
    done, torch_imported = run_probed(tmp_path, "inspect", str(fused_example), "--json")
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)["fusion"]["gates"].values()) == {0.0}
    assert not torch_imported
    examples = Path(__file__).resolve().parents[2] / "examples"
    for a, b in ((examples / "tiny-llama", fused_example), (fused_example, fused_example)):
        done, torch_imported = run_probed(tmp_path, "diff", str(a), str(b), "--no-values")
        assert done.returncode in (0, 1), done.stdout + done.stderr
        assert not torch_imported
