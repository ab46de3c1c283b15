"""Header-only speed: `inspect` and key-level `diff` on a Llama-3.1-405B-shaped sharded
checkpoint made of sparse files (valid safetensors headers, data regions that are holes, so
812 GB apparent and no disk cost).

Prints the best and median wall time of each operation over N runs (target: under 1 s each).
Then the same for a Llama-3.2-Vision-90B-shaped Mllama checkpoint (100 HF layers, 20 of them
cross-attention, [128256 + 8, 8192] embedding), inspected as a fused model and key-diffed
against its 90B text decoder's plain form, from headers alone.
Usage: python benchmarks/bench_inspect_diff.py [--repeats 5] [--preset llama3_1_405b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fusesurgery.config import DecoderConfig, FusionConfig, RopeScaling, preset
from fusesurgery.convert import layout_tensor_infos
from fusesurgery.convert.configs import hf_config_dict
from fusesurgery.convert.mllama import MLLAMA_EXTRA_ROWS, hf_cross_layers, native_to_mllama
from fusesurgery.io import TensorInfo
from fusesurgery.modules import build_fusion_layer
from fusesurgery.reports import diff_checkpoints, inspect_checkpoint
from fusesurgery.testing import write_sparse_sharded_safetensors


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


# Llama 3.2 Vision 90B's text model (SPEC.md section 3).
MLLAMA_90B = DecoderConfig(
    vocab_size=128256, embed_dim=8192, num_layers=80, num_heads=64, num_kv_heads=8,
    intermediate_dim=28672, max_seq_len=131072, rope_base=500000.0,
    rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=8192),
)
MLLAMA_90B_FUSION = FusionConfig(fusion_layers=tuple(range(3, 80, 4)), encoder_dim=8192,
                                 fusion_vocab_size=8, ca_norm_eps=1e-5)


def mllama_infos(config: DecoderConfig, fusion: FusionConfig) -> dict[str, TensorInfo]:
    """An ``MllamaForCausalLM`` checkpoint's tensors for ``config`` with ``fusion``, from
    metadata: the native fused keys spelled the Mllama way."""
    native = {info.name: info.shape
              for info in layout_tensor_infos(config, "native", kind="fused").values()}
    with torch.device("meta"):
        layer = build_fusion_layer(config, fusion)
    for index in fusion.fusion_layers:
        for key, tensor in layer.state_dict().items():
            native[f"decoder.layers.{index}.fusion_layer.{key}"] = tuple(tensor.shape)
    native["decoder.tok_embeddings.weight"] = (config.vocab_size + MLLAMA_EXTRA_ROWS,
                                               config.embed_dim)
    out = {}
    for key, shape in native.items():
        name = native_to_mllama(key, fusion.fusion_layers)
        out[name] = TensorInfo(name, shape, torch.bfloat16)
    return out


def bench_mllama(tmp: Path, repeats: int) -> None:
    infos = mllama_infos(MLLAMA_90B, MLLAMA_90B_FUSION)
    mllama, plain = tmp / "mllama-90b", tmp / "text-90b"
    write_sparse_sharded_safetensors(mllama, infos, max_shard_size="5GiB")
    config = hf_config_dict(MLLAMA_90B)
    config.update(model_type="mllama_text_model", architectures=["MllamaForCausalLM"],
                  num_hidden_layers=100,
                  cross_attention_layers=list(hf_cross_layers(MLLAMA_90B_FUSION.fusion_layers)))
    (mllama / "config.json").write_text(json.dumps(config))
    write_sparse_sharded_safetensors(plain, layout_tensor_infos(MLLAMA_90B, "hf"),
                                     max_shard_size="5GiB")
    (plain / "config.json").write_text(json.dumps(hf_config_dict(MLLAMA_90B)))
    report = inspect_checkpoint(mllama)
    assert report.model.kind == "fused" and report.model.config.num_layers == 80
    assert report.fusion is not None and len(report.fusion.fusion_layers) == 20
    apparent = sum(f.stat().st_size for f in mllama.iterdir()) / 1e9
    print(f"mllama 90B: {len(infos)} tensors, {apparent:.0f} GB apparent; fusion layers "
          f"{list(report.fusion.fusion_layers)[:3]}... ({len(report.fusion.fusion_layers)})")
    rows = [
        ("inspect (mllama 90B)", lambda: inspect_checkpoint(mllama)),
        ("diff text 90B vs mllama", lambda: diff_checkpoints(plain, mllama)),
    ]
    for name, fn in rows:
        best, median = timed(fn, repeats)
        print(f"{name:<24} {best:>8.3f} {median:>9.3f} {median:>12.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3_1_405b")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = preset(args.preset)
    infos = layout_tensor_infos(config, "hf")
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        start = time.perf_counter()
        for out in (a, b):
            write_sparse_sharded_safetensors(out, infos, max_shard_size="5GiB")
        built = time.perf_counter() - start
        files = len(list(a.glob("*.safetensors")))
        apparent = sum(f.stat().st_size for f in a.iterdir()) / 1e9
        print(f"{args.preset}: {len(infos)} tensors in {files} shards, {apparent:.0f} GB "
              f"apparent per copy (both written in {built:.2f} s)")
        overrides = {"num_heads": config.num_heads}
        rows = [
            ("inspect", lambda: inspect_checkpoint(a, overrides)),
            ("diff (normalised keys)", lambda: diff_checkpoints(a, b, overrides=overrides)),
            ("diff --raw", lambda: diff_checkpoints(a, b, raw=True)),
        ]
        print(f"{'operation':<24} {'best s':>8} {'median s':>9} {'median / 1 s':>13}")
        for name, fn in rows:
            best, median = timed(fn, args.repeats)
            print(f"{name:<24} {best:>8.3f} {median:>9.3f} {median:>12.2f}x")
        bench_mllama(Path(tmp), args.repeats)


if __name__ == "__main__":
    main()
