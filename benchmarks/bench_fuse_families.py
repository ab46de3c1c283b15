"""`fusesurgery fuse` of each family issue 18 added, at a Llama-3.2-1B-shaped size, against
`cp -r` + sync of the same inputs: the ratio bench_fuse.py measures for the Llama pair, with
the Llama pair itself run in the same session for comparison.

Decoders (each with a bf16 CLIP-ViT-L/14-336-shaped vision tower, as `bench_fuse.py
--vision-tower-only`): Qwen3 (q/k norms, head_dim 128, tied), SmolLM3 (no RoPE every 4th
layer, tied), Qwen2.5 with YaRN (q/k/v biases, factor 4 over 32768, tied), a Mistral-NeMo-
like decoder (head_dim 128 with 32 heads: q_proj has 4096 rows for a width of 2048) and a
Phi-4-mini-like decoder (stacked qkv_proj and gate_up_proj, partial rotary 0.75, LongRoPE,
tied). Each has Llama 3.2 1B's width, depth and MLP (2048, 16 layers, 8192) and its family's
own vocabulary, so the ratios compare with the Llama pair's; and Gemma 3 1B at its own shape
(width 1152, 26 layers of 4 heads and 1 kv head of 256, MLP 6912, 262144 tokens, window 512
on 5 layers of 6, tied). Towers (each with the Llama 3.2 1B decoder): a
SigLIP2 so400m/14 at 384 px, fixed resolution (transformers stores it as `siglip`), and a
DINOv2-L/14 at 518 px (layer scale). Every input's tensor names, shapes and config.json are
transformers' own (its classes built on the meta device, the names as save_pretrained writes
them); the values are a constant, bf16.

Each pair: inputs written (then removed unless `--keep`), and `--rounds` rounds of fuse and
`cp -r` + sync alternating which goes first, each from the same start (see bench_fuse.py's
same_start); the figure is the median of the rounds' fuse/cp ratios, with the peak RssAnon of
fuse. The machine's load average is printed with each pair: on a shared VM, read the ratios
of pairs measured in the same conditions.

Usage: python benchmarks/bench_fuse_families.py [--rounds 3] [--settle 1.0] [--workdir DIR]
       [--keep] [--pairs llama,qwen3,...]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch
from bench_fuse import (
    CLI,
    common_parser,
    make_hf_checkpoint,
    run_sampled,
    run_shell,
    same_start,
    tree_bytes,
    work_directory,
)

from fusesurgery.io import TensorInfo
from fusesurgery.write import write_safetensors

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072)
# name -> (decoder: (config class, model class, settings) or a preset name,
#          encoder: the same, or a preset name)
DECODERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              {**LLAMA_1B, "num_attention_heads": 16, "head_dim": 128, "vocab_size": 151936,
               "tie_word_embeddings": True, "max_position_embeddings": 40960}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                {**LLAMA_1B, "vocab_size": 128256, "tie_word_embeddings": True,
                 "no_rope_layer_interval": 4, "max_position_embeddings": 65536}),
    "qwen2.5-yarn": ("Qwen2Config", "Qwen2ForCausalLM",
                     {**LLAMA_1B, "vocab_size": 151936, "tie_word_embeddings": True,
                      "max_position_embeddings": 32768,
                      "rope_scaling": {"type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 32768}}),
    "nemo-like": ("MistralConfig", "MistralForCausalLM",
                  {**LLAMA_1B, "head_dim": 128, "vocab_size": 131072,
                   "sliding_window": None}),
    # Gemma 3 1B's own shape (google/gemma-3-1b-pt): narrower than the others, its 262k
    # vocabulary a third of the bytes
    "gemma3-1b": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                  dict(hidden_size=1152, num_hidden_layers=26, intermediate_size=6912,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                       vocab_size=262144, sliding_window=512, sliding_window_pattern=6,
                       query_pre_attn_scalar=256, max_position_embeddings=32768,
                       tie_word_embeddings=True)),
    # Phi-4-mini's features at the others' shape: stacked qkv_proj / gate_up_proj (cut into
    # byte ranges), 3/4 of each 64-wide head rotated with LongRoPE, its 200k vocabulary
    "phi4-mini-like": ("Phi3Config", "Phi3ForCausalLM",
                       {**LLAMA_1B, "vocab_size": 200064, "tie_word_embeddings": True,
                        "partial_rotary_factor": 0.75, "original_max_position_embeddings": 4096,
                        "pad_token_id": 199999, "bos_token_id": 199999,
                        "eos_token_id": 199999,
                        "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 24,
                                         "long_factor": [1.0] * 24}}),
}
TOWERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "siglip2-so400m-384": ("SiglipVisionConfig", "SiglipVisionModel",
                           dict(hidden_size=1152, intermediate_size=4304,
                                num_hidden_layers=27, num_attention_heads=16, image_size=384,
                                patch_size=14)),
    "dinov2-large": ("Dinov2Config", "Dinov2Model",
                     dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          mlp_ratio=4, image_size=518, patch_size=14)),
}
PAIRS = ["llama", *DECODERS, *TOWERS]


def write_transformers_layout(path: Path, spec: tuple[str, str, dict[str, Any]]) -> None:
    """A bf16 checkpoint with transformers' own names, shapes and config.json for ``spec``;
    every value a constant (the copy costs the same, and no random draw costs CPU)."""
    import transformers  # noqa: PLC0415 - a dev dependency, only for the inputs
    from transformers.core_model_loading import revert_weight_conversion  # noqa: PLC0415

    config_cls, model_cls, settings = spec
    config = getattr(transformers, config_cls)(**settings)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(config)
    tied = getattr(config, "tie_word_embeddings", False)
    # the names save_pretrained writes (transformers 5 renames some classes' parameters)
    state = revert_weight_conversion(model, model.state_dict())
    shapes = {key: tuple(t.shape) for key, t in state.items()
              if not (tied and key == "lm_head.weight")}
    infos = [TensorInfo(key, shape, torch.bfloat16) for key, shape in shapes.items()]
    write_safetensors(path, infos,
                      lambda key: torch.full(shapes[key], 0.02, dtype=torch.bfloat16),
                      extra_files={"config.json": config.to_json_string()})


def inputs_of(work: Path, pair: str) -> tuple[Path, Path]:
    """The pair's encoder and decoder directories, written if absent."""
    enc_name = pair if pair in TOWERS else "clip_vit_l_14_336"
    dec_name = pair if pair in DECODERS else "llama3_2_1b"
    enc, dec = work / f"enc-{enc_name}", work / f"dec-{dec_name}"
    for path, name in ((enc, enc_name), (dec, dec_name)):
        stamp = path / "bench_inputs.json"
        if stamp.exists():
            continue
        shutil.rmtree(path, ignore_errors=True)
        if name in TOWERS or name in DECODERS:
            write_transformers_layout(path, {**TOWERS, **DECODERS}[name])
        else:
            make_hf_checkpoint(path, name, "vision" if path is enc else "decoder")
        stamp.write_text(json.dumps({"name": name}))
    return enc, dec


def measure(work: Path, pair: str, rounds: int, settle: float) -> dict[str, Any]:
    enc, dec = inputs_of(work, pair)
    out, out_cp = work / "out-fuse", work / "out-cp"
    for stale in (out, out_cp):
        shutil.rmtree(stale, ignore_errors=True)
    fuse_cmd = [CLI, "fuse", str(enc), str(dec), "-o", str(out), "-q"]
    cp_cmd = (f"mkdir {out_cp} && cp -r {enc} {dec} {out_cp}/ && "
              f"find {out_cp} -type f -exec sync {{}} +")
    times: dict[str, list[float]] = {"fuse": [], "cp": []}
    peaks, written = [], 0
    for round_number in range(rounds):
        order = ("fuse", "cp") if round_number % 2 == 0 else ("cp", "fuse")
        for name in order:
            same_start([enc, dec], settle)
            if name == "fuse":
                seconds, peak = run_sampled(fuse_cmd)
                written = tree_bytes(out)
                peaks.append(peak)
                shutil.rmtree(out)
            else:
                seconds = run_shell(cp_cmd)
                shutil.rmtree(out_cp)
            times[name].append(seconds)
    ratios = [f / c for f, c in zip(times["fuse"], times["cp"], strict=True)]
    return {"pair": pair, "inputs_gb": (tree_bytes(enc) + tree_bytes(dec)) / 1e9,
            "written_gb": written / 1e9, "fuse_s": statistics.median(times["fuse"]),
            "cp_s": statistics.median(times["cp"]), "ratio": statistics.median(ratios),
            "rounds": ratios, "peak_mb": max(peaks) / 1e6, "load": os.getloadavg()[0]}


def main() -> None:
    parser = common_parser(__doc__)
    parser.add_argument("--pairs", default=",".join(PAIRS),
                        help=f"comma-separated, of {', '.join(PAIRS)}")
    args = parser.parse_args()
    pairs = args.pairs.split(",")
    unknown = sorted(set(pairs) - set(PAIRS))
    if unknown:
        parser.error(f"unknown pairs {unknown}; valid: {', '.join(PAIRS)}")
    work, temporary = work_directory(args, "fuse-families")
    print(f"inputs in {work}; {args.rounds} rounds a pair, fuse and cp alternating, "
          f"{args.settle:g} s settle; {os.cpu_count()} CPUs")
    print(f"{'pair':<20} {'inputs GB':>9} {'fused GB':>9} {'fuse s':>7} {'cp s':>7} "
          f"{'fuse/cp':>8} {'rounds':<20} {'peak MB':>8} {'load':>5}", flush=True)
    try:
        for pair in pairs:
            row = measure(work, pair, args.rounds, args.settle)
            print(f"{pair:<20} {row['inputs_gb']:>9.2f} {row['written_gb']:>9.2f} "
                  f"{row['fuse_s']:>7.2f} {row['cp_s']:>7.2f} {row['ratio']:>8.2f} "
                  f"{', '.join(f'{r:.2f}' for r in row['rounds']):<20} "
                  f"{row['peak_mb']:>8.0f} {row['load']:>5.1f}", flush=True)
            if not args.keep:  # the next pair's inputs in the space of these
                for path in work.iterdir():
                    if path.name.startswith("enc-") and pair in TOWERS or (
                            path.name.startswith("dec-") and pair in DECODERS):
                        shutil.rmtree(path)
    finally:
        shutil.rmtree(work / "out-fuse", ignore_errors=True)
        shutil.rmtree(work / "out-cp", ignore_errors=True)
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
