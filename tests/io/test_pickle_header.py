"""Names, shapes and dtypes of a torch.save state dict read from its pickle without torch
(``read_torch_pickle_infos``): the same as torch.load gives, in the same order; anything but
a plain dense state dict in a sound archive goes the torch.load way; and ``inspect`` of a
.pt file or a Meta checkpoint does not import torch."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fusesurgery.io import open_checkpoint
from fusesurgery.io.torch_pickle import load_torch_state_dict, read_torch_pickle_infos

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _described(infos) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(info.name, tuple(info.shape), info.dtype) for info in infos]


def _torch_view(path: Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(name, tuple(t.shape), t.dtype) for name, t in load_torch_state_dict(path).items()]


def test_every_dtype_parameters_shared_storages_and_views(tmp_path):
    table = torch.randn(6, 4)
    state = {f"t.{str(dtype).removeprefix('torch.')}": torch.ones(3, 2, dtype=dtype)
             for dtype in DTYPES}
    state.update({
        "embed.weight": table, "head.weight": table,  # one storage, saved once
        "rows": table[2:5],  # a view at an offset
        "transposed": table.t(),  # strided
        "param": torch.nn.Parameter(torch.zeros(5)),
        "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 7),
    })
    path = tmp_path / "state.pt"
    torch.save(state, path)
    infos = read_torch_pickle_infos(path)
    assert infos is not None and _described(infos) == _torch_view(path)
    assert {info.file for info in infos} == {path}


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "module"])
def test_wrapped_state_dicts_as_torch_load_picks_them(tmp_path, wrapper):
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: {"w": torch.ones(2)}, "epoch": 3, "step": torch.tensor(1)}, path)
    assert _described(read_torch_pickle_infos(path)) == _torch_view(path)


@pytest.mark.parametrize("case", ["sparse", "quantized", "meta", "no state dict",
                                  "compressed", "truncated record"])
def test_anything_else_goes_the_torch_way(tmp_path, case):
    path = tmp_path / "odd.pt"
    if case == "sparse":
        torch.save({"s": torch.eye(3).to_sparse()}, path)
    elif case == "quantized":
        torch.save({"q": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)}, path)
    elif case == "meta":
        torch.save({"m": torch.empty(3, device="meta")}, path)
    elif case == "no state dict":
        torch.save([torch.ones(2)], path)
    else:
        torch.save({"w": torch.ones(64)}, tmp_path / "plain.pt")
        with zipfile.ZipFile(tmp_path / "plain.pt") as source, zipfile.ZipFile(
                path, "w") as target:
            for record in source.infolist():
                data = source.read(record)
                if record.filename.endswith("/data/0") and case == "truncated record":
                    data = data[:8]
                kind = zipfile.ZIP_DEFLATED if case == "compressed" and \
                    record.filename.endswith("/data/0") else zipfile.ZIP_STORED
                target.writestr(record.filename, data, compress_type=kind)
    assert read_torch_pickle_infos(path) is None


def test_tensors_load_on_first_use_and_match(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    path = tmp_path / "state.pt"
    torch.save(state, path)
    with open_checkpoint(path) as source:
        assert [info.name for info in source.infos().values()] == ["a", "b"]
        assert torch.equal(source.get_tensor("a"), state["a"])
        assert torch.equal(source.get_tensor("b"), state["b"])


@pytest.mark.parametrize("kind", ["pt", "meta"])
def test_inspect_of_a_pickle_does_not_import_torch(tmp_path, kind):
    examples = Path(__file__).resolve().parents[2] / "examples"
    from safetensors.torch import load_file

    tensors = load_file(examples / "tiny-llama" / "model.safetensors")
    if kind == "pt":
        path = tmp_path / "llama"
        path.mkdir()
        torch.save(tensors, path / "pytorch_model.bin")
        (path / "config.json").write_bytes((examples / "tiny-llama" / "config.json").read_bytes())
    else:  # Meta's consolidated.00.pth and params.json, as convert --to meta writes them
        from fusesurgery.write import convert_checkpoint
        from tests.tiny_models import save_tiny_hf_decoder

        path = tmp_path / "meta"
        convert_checkpoint(save_tiny_hf_decoder("llama", tmp_path / "hf"), path, to="meta")
        assert (path / "consolidated.00.pth").is_file()
    code = ("import sys\nfrom fusesurgery.cli import main\nsys.argv = ['fusesurgery', "
            f"'inspect', {str(path)!r}]\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nassert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "keys (" in done.stdout
