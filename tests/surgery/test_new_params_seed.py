"""``seed`` reaches every new tensor: torch's CPU generator keeps only the low 32 bits of its
seed, so a seed placed above them (as the code once did) changed nothing at all."""

import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fusesurgery
from fusesurgery.surgery.fuse_plan import NewTensor
from fusesurgery.surgery.new_params import generator_for, make_new_tensor

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_each_seed_draws_its_own_values_and_seed_0_those_it_always_drew():
    spec = NewTensor("decoder.layers.1.fusion_layer.attn.q_proj.weight", (16, 8),
                     torch.float32, ("uniform", 0.1))
    drawn = {seed: make_new_tensor(spec, seed) for seed in (0, 1, 5, 2**31, 2**32 - 1)}
    for seed, tensor in drawn.items():
        for other, values in drawn.items():
            assert (seed == other) == torch.equal(tensor, values), (seed, other)
    # seed 0: the stream of the name's crc32, what every fuse with the default seed wrote
    expected = torch.empty(16 * 8).uniform_(
        -0.1, 0.1, generator=torch.Generator().manual_seed(zlib.crc32(spec.name.encode())))
    assert torch.equal(drawn[0].view(-1), expected)
    # and the same seed twice is the same tensor
    assert torch.equal(make_new_tensor(spec, 5), drawn[5])


def test_names_stay_independent_under_one_seed():
    first, second = (torch.rand(8, generator=generator_for(7, name)) for name in ("a", "b"))
    assert not torch.equal(first, second)


def _new_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                if "fusion" in key or "projection" in key:
                    tensors[key] = handle.get_tensor(key)
    return tensors


@pytest.mark.parametrize("embedding_init", [None, "normal"])
def test_fuse_with_another_seed_writes_other_new_parameters(tmp_path, embedding_init):
    options = {} if embedding_init is None else {"embedding_init": embedding_init}
    outs = {}
    for name, seed in (("a", 0), ("b", 5), ("c", 5)):
        fusesurgery.fuse(EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama",
                         tmp_path / name, every=2, seed=seed, **options)
        outs[name] = _new_tensors(tmp_path / name)
    drawn = [key for key, value in outs["a"].items()  # random, not constant (norms, gates)
             if value.numel() > 1 and value.float().std() > 0
             and (embedding_init or "fusion_embedding" not in key)]  # default rows: the mean
    assert drawn, "the fuse drew no random tensor"
    assert (embedding_init == "normal") == any("fusion_embedding" in key for key in drawn)
    for key in drawn:  # every randomly drawn tensor moves with the seed
        assert not torch.equal(outs["a"][key], outs["b"][key]), key
        assert torch.equal(outs["b"][key], outs["c"][key]), key
