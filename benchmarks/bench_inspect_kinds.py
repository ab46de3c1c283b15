"""Whole-process `fusesurgery inspect` of every kind of checkpoint it supports, against
`python -c pass`: a Hugging Face directory of each decoder family (Llama, Mistral, Qwen2,
Qwen3, SmolLM3) and each vision-tower family (CLIP, SigLIP, SigLIP2 NaFlex, DINOv2, DINOv3),
all written by transformers' own classes; a fused native directory (the bundled examples
fused); its transformers export (`convert --to transformers`); a `torch.save` state dict
(`pytorch_model.bin`); and a Meta checkpoint (`consolidated.00.pth` + `params.json`).
Issue 18's target: each under 0.5 s.

The checkpoints are tiny: `inspect` reads headers and config files only, so what a whole
process costs is the interpreter, the imports and the reading of a few files, whatever the
model's size (bench_startup.py and bench_inspect_diff.py measure a 405B-shaped one). Each
round runs every contender once as a fresh process, in an order rotated from round to round,
so a slow moment of a shared machine falls on all of them; a contender's figures are its
median time and the median over rounds of its ratio to `python -c pass`. `--importtime` adds,
for each kind over the target, the modules that cost most in `python -X importtime` (what
to look at first when one is over).

Usage: python benchmarks/bench_inspect_kinds.py [--rounds 3] [--workdir DIR] [--keep]
       [--importtime]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_fuse import common_parser, work_directory

TARGET_S = 0.5
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, patch_size=8)
# name -> (transformers config class, model class, settings)
HF_CHECKPOINTS = {
    "hf llama": ("LlamaConfig", "LlamaForCausalLM", DECODER),
    "hf mistral": ("MistralConfig", "MistralForCausalLM", DECODER),
    "hf qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**DECODER, "tie_word_embeddings": True}),
    "hf qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**DECODER, "head_dim": 8}),
    "hf smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                   {**DECODER, "pad_token_id": None, "bos_token_id": None,
                    "eos_token_id": None}),
    "hf clip": ("CLIPVisionConfig", "CLIPVisionModel", {**VISION, "image_size": 16}),
    "hf siglip": ("SiglipVisionConfig", "SiglipVisionModel", {**VISION, "image_size": 16}),
    "hf siglip2 naflex": ("Siglip2VisionConfig", "Siglip2VisionModel",
                          {**VISION, "num_patches": 16}),
    "hf dinov2": ("Dinov2Config", "Dinov2Model", {**VISION, "image_size": 16}),
    "hf dinov3": ("DINOv3ViTConfig", "DINOv3ViTModel",
                  {**VISION, "image_size": 16, "num_register_tokens": 2}),
}


def fusesurgery_command() -> list[str]:
    script = Path(sys.executable).with_name("fusesurgery")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fusesurgery"]


def build(work: Path, cli: list[str]) -> dict[str, Path]:
    """Every checkpoint kind, written into ``work`` (each by transformers or by fusesurgery's
    own commands from the bundled examples)."""
    import torch  # noqa: PLC0415 - only to build the inputs
    import transformers  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    paths = {}
    for name, (config_cls, model_cls, settings) in HF_CHECKPOINTS.items():
        path = work / name.replace(" ", "-")
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**settings)
        getattr(transformers, model_cls)(config).save_pretrained(path)
        paths[name] = path
    fused = work / "fused"
    subprocess.run([*cli, "fuse", str(EXAMPLES / "tiny-clip-vision"),
                    str(EXAMPLES / "tiny-llama"), "-o", str(fused), "--every", "2", "-q",
                    "--overwrite"], check=True)
    paths["fused native"] = fused
    export = work / "export"
    subprocess.run([*cli, "convert", str(fused), "-o", str(export), "--to", "transformers",
                    "-q", "--overwrite"], check=True)
    paths["transformers export"] = export
    pickle = work / "pt"
    pickle.mkdir(exist_ok=True)
    torch.save(load_file(EXAMPLES / "tiny-llama" / "model.safetensors"),
               pickle / "pytorch_model.bin")
    shutil.copy(EXAMPLES / "tiny-llama" / "config.json", pickle / "config.json")
    paths["torch .bin"] = pickle
    meta = work / "meta"
    subprocess.run([*cli, "convert", str(paths["hf llama"]), "-o", str(meta), "--to", "meta",
                    "-q", "--overwrite"], check=True)
    paths["meta"] = meta
    for name, path in paths.items():  # each is what it should be
        report = json.loads(subprocess.run([*cli, "inspect", str(path), "--json"],
                                           capture_output=True, text=True, check=True).stdout)
        kind = report.get("architecture", {}).get("kind", report.get("kind"))
        print(f"  {name:<20} {report.get('format', '-'):<20} {kind}")
    return paths


def run_once(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return elapsed


def costliest_imports(path: Path, count: int = 8) -> list[tuple[int, str]]:
    """``(cumulative microseconds, module)`` of the costliest imports of one inspect."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "fusesurgery", "inspect",
                           str(path)], capture_output=True, text=True)
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, module = (part.strip() for part in line[12:].split("|"))
            if cumulative.isdigit():
                rows.append((int(cumulative), module))
    return sorted(rows, reverse=True)[:count]


def main() -> None:
    parser = common_parser(__doc__)
    parser.add_argument("--importtime", action="store_true",
                        help="the costliest imports of each kind over the target")
    args = parser.parse_args()
    work, temporary = work_directory(args, "inspect-kinds")
    cli = fusesurgery_command()
    try:
        print(f"inputs in {work}:")
        paths = build(work, cli)
        everything = {"python -c pass": [sys.executable, "-c", "pass"],
                      **{name: [*cli, "inspect", str(path)] for name, path in paths.items()}}
        names = list(everything)
        for name in names:  # one unmeasured run each: page cache, .pyc files
            run_once(everything[name])
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            time.sleep(args.settle)
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(run_once(everything[name]))
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        print(f"{args.rounds} rounds; load average {' '.join(load)}; command: {' '.join(cli)}")
        print(f"{'inspect of':<22} {'median s':>9} {'best s':>8} {'/ python':>9}")
        over = []
        for name in names:
            rounds = times[name]
            ratio = statistics.median(
                t / p for t, p in zip(rounds, times["python -c pass"], strict=True))
            verdict = ""
            if name != "python -c pass":
                verdict = "  ok" if statistics.median(rounds) < TARGET_S else "  OVER 0.5 s"
                if statistics.median(rounds) >= TARGET_S:
                    over.append(name)
            print(f"{name:<22} {statistics.median(rounds):>9.3f} {min(rounds):>8.3f} "
                  f"{ratio:>8.1f}x{verdict}")
        if args.importtime:
            for name in over:
                print(f"costliest imports of inspect {name} (cumulative ms):")
                for micros, module in costliest_imports(paths[name]):
                    print(f"  {micros / 1000:8.1f}  {module}")
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
