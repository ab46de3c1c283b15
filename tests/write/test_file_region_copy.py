import errno

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file

from fusesurgery import load_decoder
from fusesurgery.convert.transforms import (
    IDENTITY,
    PERMUTE_QK_TO_NATIVE,
    apply_transform,
    row_order,
)
from fusesurgery.errors import ShapeError
from fusesurgery.io import PermutedRegion, TensorInfo, open_checkpoint
from fusesurgery.write import convert_checkpoint, safetensors_writer, write_safetensors


def test_file_regions_are_copied_byte_for_byte(tmp_path):
    # neighbours in the source are copied together; the f16 tensor breaks the run
    tensors = {"w": torch.randn(64, 33), "h": torch.randn(5).to(torch.float16),
               "v": torch.randn(7), "u": torch.randn(3, 3)}
    save_file(tensors, tmp_path / "src.safetensors")
    with open_checkpoint(tmp_path / "src.safetensors") as source:
        infos = list(source.infos().values())
        written = []
        write_safetensors(tmp_path / "out", infos, source.file_region,
                          on_tensor_written=written.append)
        assert sorted(info.name for info in written) == sorted(tensors)
        with pytest.raises(ShapeError, match="file region"):
            write_safetensors(tmp_path / "bad", infos[:1],
                              lambda key: source.file_region("h" if key == "w" else "w"))
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "out" / "model.safetensors"
    with open_checkpoint(tmp_path / "src.safetensors") as source, open_checkpoint(out) as copy:
        # the data region starts where the source's does, modulo a page
        for key in tensors:
            assert (copy.file_region(key).offset - source.file_region(key).offset) % 4096 == 0
    with safe_open(out, "pt") as f:
        for key, expected in tensors.items():
            assert torch.equal(f.get_tensor(key), expected)


def _permuted_sources(tmp_path, tensors, orders):
    """Write ``tensors`` with the writer fed PermutedRegions of a saved copy of them."""
    save_file(tensors, tmp_path / "src.safetensors")
    with open_checkpoint(tmp_path / "src.safetensors") as source:
        infos = list(source.infos().values())
        write_safetensors(
            tmp_path / "out", infos,
            lambda key: PermutedRegion(source.file_region(key), tuple(orders[key])),
        )
    return tmp_path / "out" / "model.safetensors"


def test_permuted_regions_write_the_rows_in_their_new_order(tmp_path):
    generator = torch.Generator().manual_seed(0)
    # 2500 rows: more stretches than one writev takes (IOV_MAX 1024), and an order with
    # runs of consecutive rows, which are written as one stretch.
    tensors = {"q": torch.randn(2500, 6, generator=generator).to(torch.bfloat16),
               "k": torch.randn(64, 3, generator=generator),
               "e": torch.randn(1, 4, generator=generator)}
    runs = torch.randperm(2500, generator=generator).tolist()
    runs[10:20] = sorted(runs[10:20])
    orders = {"q": runs, "k": torch.randperm(64, generator=generator).tolist(), "e": [0]}
    out = _permuted_sources(tmp_path, tensors, orders)
    with safe_open(out, "pt") as f:
        for key, tensor in tensors.items():
            assert torch.equal(f.get_tensor(key), tensor[orders[key]]), key


def test_permuted_regions_match_the_rope_transform(tmp_path):
    weight = torch.randn(4 * 8, 16).to(torch.bfloat16)
    transform = (PERMUTE_QK_TO_NATIVE, 4, 8)
    order = row_order(transform, weight.shape[0])
    out = _permuted_sources(tmp_path, {"w": weight}, {"w": order})
    with safe_open(out, "pt") as f:
        assert torch.equal(f.get_tensor("w"), apply_transform(transform, weight))
    assert row_order((IDENTITY,), 32) is None


def test_permuted_regions_are_read_when_the_file_cannot_be_mapped(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.ENODEV, "no mmap here")

    monkeypatch.setattr(safetensors_writer.mmap, "mmap", refuse)
    weight = torch.arange(40.0).reshape(10, 4)
    order = [9, 8, 7, 0, 1, 2, 3, 4, 5, 6]
    out = _permuted_sources(tmp_path, {"w": weight}, {"w": order})
    with safe_open(out, "pt") as f:
        assert torch.equal(f.get_tensor("w"), weight[order])


@pytest.mark.parametrize(
    ("order", "message"),
    [([0, 1, 2], "does not fit"), ([0, 0, 1, 2], "not a permutation"),
     ([0, 1, 2, 4], "not a permutation")],
)
def test_bad_row_orders_are_refused(tmp_path, order, message):
    with pytest.raises(ShapeError, match=message):
        _permuted_sources(tmp_path, {"w": torch.zeros(4, 2)}, {"w": order})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("max_shard_size", "mirrored"), [("5GB", 1), ("20KB", 0)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_conversion_gathers_rope_rows_from_the_file(tmp_path, monkeypatch, max_shard_size,
                                                     mirrored, family):
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**sizes)).eval()
    else:  # q/k/v biases, and tied embeddings
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**sizes, tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path / "hf")
    calls = {"_write_permuted": [], "_write_mirror": []}
    for name, seen in calls.items():
        real = getattr(safetensors_writer, name)

        def spy(*args, real=real, seen=seen, **kwargs):
            seen.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(safetensors_writer, name, spy)
    result = convert_checkpoint(tmp_path / "hf", tmp_path / "native",
                                max_shard_size=max_shard_size)
    # One HF file under the size limit becomes one shard, copied whole, then patched; with a
    # small limit, the shards are written tensor by tensor. Either way only Llama's q and k
    # of both layers are permuted; native Qwen2 keeps Hugging Face's rows (rotate-half RoPE).
    assert len(calls["_write_mirror"]) == mirrored
    assert result.written.plan.is_sharded == (not mirrored)
    assert len(calls["_write_permuted"]) == (4 if family == "llama" else 0)
    with open_checkpoint(tmp_path / "hf") as hf, open_checkpoint(tmp_path / "native") as native:
        assert len(native.keys()) == len(hf.keys())
        for layer in range(2):
            for name, heads in (("q", 4), ("k", 2)):
                source = hf.get_tensor(f"model.layers.{layer}.self_attn.{name}_proj.weight")
                if family == "llama":
                    source = apply_transform((PERMUTE_QK_TO_NATIVE, heads, 8), source)
                assert torch.equal(
                    native.get_tensor(f"layers.{layer}.attn.{name}_proj.weight"), source)
            assert torch.equal(
                native.get_tensor(f"layers.{layer}.mlp.w1.weight"),
                hf.get_tensor(f"model.layers.{layer}.mlp.gate_proj.weight"))
    tokens = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_decoder(tmp_path / "native")(tokens),
                                   model(tokens).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("rename", "order", "mirrored"),
    [
        (lambda key: key.removeprefix("model."), ["model.a", "model.b", "model.c"], 1),
        # a header longer than the source's cannot take its place
        (lambda key: key * 40, ["model.a", "model.b", "model.c"], 0),
        # another order, or a tensor left out, is not the source file any more
        (lambda key: key, ["model.b", "model.a", "model.c"], 0),
        (lambda key: key, ["model.a", "model.b"], 0),
    ],
)
def test_a_shard_that_is_a_source_file_is_copied_whole(tmp_path, monkeypatch, rename, order,
                                                       mirrored):
    tensors = {"model.a": torch.randn(40, 8), "model.b": torch.randn(16, 8),
               "model.c": torch.randn(3)}
    save_file(tensors, tmp_path / "src.safetensors", metadata={"format": "pt"})
    mirrors = []
    real = safetensors_writer._write_mirror
    monkeypatch.setattr(safetensors_writer, "_write_mirror",
                        lambda *args: (mirrors.append(args), real(*args)))
    with open_checkpoint(tmp_path / "src.safetensors") as source:
        new_names = {rename(key): key for key in order}
        infos = [TensorInfo(name, tuple(tensors[key].shape), tensors[key].dtype)
                 for name, key in new_names.items()]

        def get(name):
            key = new_names[name]
            region = source.file_region(key)
            # rows of "model.a" reversed, the others as they are
            return PermutedRegion(region, tuple(range(39, -1, -1))) if key == "model.a" else region

        written = []
        write_safetensors(tmp_path / "out", infos, get, on_tensor_written=written.append)
    assert len(mirrors) == mirrored
    assert sorted(info.name for info in written) == sorted(new_names)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(new_names)
        for name, key in new_names.items():
            expected = tensors[key].flip(0) if key == "model.a" else tensors[key]
            assert torch.equal(f.get_tensor(name), expected), name


def test_a_sharded_source_keeps_its_shards_and_each_is_mirrored(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    sources = sorted(path.name for path in (tmp_path / "hf").glob("*.safetensors"))
    assert len(sources) > 2
    mirrored = []
    real = safetensors_writer._write_mirror
    monkeypatch.setattr(safetensors_writer, "_write_mirror",
                        lambda *args: (mirrored.append(args[1].name), real(*args)))
    result = convert_checkpoint(tmp_path / "hf", tmp_path / "native")
    # one output shard per source file, each that file under new names
    assert len(result.written.plan.shards) == len(sources)
    assert mirrored == sources
    tokens = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_decoder(tmp_path / "native")(tokens),
                                   model(tokens).logits, rtol=0, atol=1e-5)
