"""`fusesurgery validate OUT --against DEC` (whole process, imports included) against a script
doing only the forward passes validate needs, on a Llama-3.2-1B-shaped bf16 decoder fused with
a CLIP-ViT-L/14-336-shaped tower (the inputs of `bench_fuse.py`, built the same way).

The forward passes validate needs: the vision tower once (its output feeds every check with an
image) and the decoder on 8 tokens. The contender doing only those is a child process that
imports torch and transformers, loads the decoder with `AutoModelForCausalLM.from_pretrained`
and the tower with `AutoModel.from_pretrained` (each in the checkpoint's dtype, bf16), and
runs one forward of each: the decoder on 8 random tokens, the tower on one random image, cut
to the layers the fused model uses (`hidden_states[-2]`: all but the last). So the ratio
measured is validate's whole cost (imports, reading both checkpoints, every check) over the
cost of those forward passes, process start, imports and loading included on both sides; the
two passes' own time (timed inside that process) is printed too, with validate's wall time
over it, a stricter figure.

Each round runs both from the same start (pending writes synced, the inputs and the fused
checkpoint read into the page cache, `--settle` seconds of sleep), alternating which goes
first; the ratio reported is the median of the per-round ratios (validate / forwards), with
peak RssAnon (anonymous memory, sampled every ~20 ms; not the mapped checkpoint pages) of each.
The claim checked: ratio <= 2. On a shared machine timings vary run to run; the per-round
ratios are printed so the spread shows.

Usage: python benchmarks/bench_validate.py [--workdir DIR] [--keep] [--rounds 3]
       [--settle 1.0] [--decoder-preset llama3_2_1b] [--encoder-preset clip_vit_l_14_336]
       (develop with: --decoder-preset tiny --encoder-preset tiny_clip --rounds 1)
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fuse import (  # noqa: E402
    CLI,
    build_inputs,
    common_parser,
    run_sampled,
    same_start,
    tree_bytes,
    work_directory,
)

FUSED_STAMP = "bench_validate_fused.json"

FORWARDS = """
import json
import sys
import time
import torch
import transformers

transformers.logging.disable_progress_bar()
decoder_dir, encoder_dir, tower_layers, report = sys.argv[1:5]
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    decoder = transformers.AutoModelForCausalLM.from_pretrained(
        decoder_dir, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, decoder.config.vocab_size, (1, 8), generator=generator)
    start = time.perf_counter()
    logits = decoder(tokens).logits
    decoder_seconds = time.perf_counter() - start
    tower = transformers.AutoModel.from_pretrained(encoder_dir, dtype=torch.bfloat16).eval()
    encoder = (getattr(tower, "vision_model", None) or tower).encoder
    encoder.layers = encoder.layers[:int(tower_layers)]
    side = tower.config.image_size
    images = torch.randn(1, 3, side, side, generator=generator).to(torch.bfloat16)
    start = time.perf_counter()
    hidden = tower(pixel_values=images).last_hidden_state
    tower_seconds = time.perf_counter() - start
assert torch.isfinite(logits).all() and torch.isfinite(hidden).all()
with open(report, "w") as f:
    json.dump({"decoder": decoder_seconds, "tower": tower_seconds}, f)
"""


def fuse_once(enc: Path, dec: Path, out: Path) -> None:
    """The fused checkpoint validate reads, written by `fusesurgery fuse` unless an earlier
    run left a complete one."""
    stamp = out / FUSED_STAMP
    if not stamp.exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([CLI, "fuse", str(enc), str(dec), "-o", str(out), "-q"], check=True)
        stamp.write_text(json.dumps({"encoder": enc.name, "decoder": dec.name}))


def tower_layers(out: Path) -> int:
    """How many tower layers the fused model runs (its ``encoder.output_layer``)."""
    config = json.loads((out / "fusion_config.json").read_text())["encoder"]
    layers, output_layer = config["num_layers"], config.get("output_layer")
    if output_layer is None:
        return layers
    return output_layer + layers + 1 if output_layer < 0 else output_layer


def main() -> None:
    parser = common_parser(__doc__)
    args = parser.parse_args()

    work, temporary = work_directory(args, "validate")
    try:
        print(f"inputs in {work}:")
        enc, dec = build_inputs(work, args.decoder_preset, args.encoder_preset)
        out = work / f"fused-{args.decoder_preset}-{args.encoder_preset}"
        fuse_once(enc, dec, out)
        layers = tower_layers(out)
        print(f"  {out.name}: {tree_bytes(out) / 1e6:.1f} MB; the tower runs {layers} layers")
        validate_cmd = [CLI, "validate", str(out), "--against", str(dec)]
        passes_file = work / "bench_validate_passes.json"
        forwards_cmd = [sys.executable, "-c", FORWARDS, str(dec), str(enc), str(layers),
                        str(passes_file)]
        passes: list[float] = []  # the forward passes alone, timed inside the process
        cached = [enc, dec, out]
        times: dict[str, list[float]] = {"validate": [], "forwards": []}
        peaks: dict[str, list[int]] = {"validate": [], "forwards": []}
        print(f"{args.rounds} rounds, alternating order, each run from the same start "
              f"(synced, inputs cached, {args.settle:g} s pause)\n")
        for round_number in range(args.rounds):
            order = ("validate", "forwards") if round_number % 2 == 0 else ("forwards",
                                                                            "validate")
            for name in order:
                same_start(cached, args.settle)
                seconds, peak = run_sampled(validate_cmd if name == "validate"
                                            else forwards_cmd)
                times[name].append(seconds)
                peaks[name].append(peak)
                if name == "forwards":
                    timed = json.loads(passes_file.read_text())
                    passes.append(timed["decoder"] + timed["tower"])
            print(f"  round {round_number + 1} ({order[0]} first): validate "
                  f"{times['validate'][-1]:.2f} s, forwards {times['forwards'][-1]:.2f} s "
                  f"(of which the two passes {passes[-1]:.2f} s), ratio "
                  f"{times['validate'][-1] / times['forwards'][-1]:.2f}", flush=True)

        ratios = [v / f for v, f in zip(times["validate"], times["forwards"], strict=True)]
        ratio = statistics.median(ratios)
        print(f"\n{'contender':34s} {'best s':>8s} {'median s':>9s} {'peak RssAnon':>13s}")
        for name, label in (("validate", "fusesurgery validate --against"),
                            ("forwards", "transformers forwards only")):
            print(f"{label:34s} {min(times[name]):8.2f} {statistics.median(times[name]):9.2f} "
                  f"{max(peaks[name]) / 1e6:10.0f} MB")
        print(f"\nvalidate / forwards: median of rounds {ratio:.2f} (rounds "
              f"{', '.join(f'{r:.2f}' for r in ratios)}); target <= 2: "
              f"{'PASS' if ratio <= 2 else 'FAIL'}")
        over_passes = statistics.median(v / p for v, p in zip(times["validate"], passes,
                                                               strict=True))
        print(f"validate (whole process) / the two passes alone (timed inside the forwards "
              f"process, no imports or loading): median {over_passes:.2f}")
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
