"""`fusesurgery convert FUSED --to transformers` and the exported model in transformers, on a
Llama-3.2-1B-shaped bf16 decoder fused with a CLIP-ViT-L/14-336-shaped tower (the inputs of
`bench_fuse.py`, fused once as `bench_validate.py` does).

What is measured (whole processes, timed from the parent, imports included, unless said):

1. Export: `fusesurgery convert FUSED -o OUT --to transformers` against `cp -r FUSED OUT2 &&
   sync FILES`, alternating which goes first, each from the same start (synced, inputs in the
   page cache, `--settle` seconds of sleep); the median of the per-round ratios, and the
   export's peak RssAnon (sampled every ~20 ms) against 300 MB + the largest tensor. Targets
   (issue 17): ratio <= 1.3, peak within the bound.
2. Loading: a child process that imports torch, transformers and fusesurgery and then runs
   `AutoModelForImageTextToText.from_pretrained(EXPORT)`, against one that runs
   `AutoModelForCausalLM.from_pretrained(DECODER)` on the source decoder; both timed whole and
   around `from_pretrained` alone (inside the child), alternating. Target: the median ratio
   (of the `from_pretrained` times) at most (export bytes / decoder bytes) x 1.2.
   2b. The same two loads alternating in one warm process (one untimed load of each first),
   at least 5 rounds: the median of the per-round ratios (no target of its own).
3. Cost per new token: one child loads the export and runs greedy `generate` from 16 tokens
   with an image (the image token at position 1, a random image) and without one, alternating
   for `--rounds` rounds, `--new-tokens` tokens each (`min_new_tokens` forces the length). A
   forward hook times every call of the model; the calls after the first are the decoding
   steps, whose median is the cost per new token (the first call, with the tower and the
   image keys/values, is the prefill). One untimed short generate of each comes first.
   Target: with / without an image <= 1.2 (median of the per-round ratios).
   3b. (`--parts steps`) The same cost as single decoding steps in one warm process, less
   exposed to a shared machine: the export prefilled once with the image and once without
   (two caches), then one decoding step of each alternating for `max(--rounds, 15)` rounds,
   each cache cropped back after its step; the median of the per-round ratios. `steps-native`
   measures `fusesurgery.load_fused(FUSED)` (the native modules) the way part 3 measures the
   export: `fusesurgery.generate` with and without the image, alternating for `--rounds`
   rounds of `--new-tokens` tokens, a round's cost its median decoding step. With
   `--threads 1` it also reports the steps' CPU time, which a busy machine's other processes
   do not inflate as they do the wall time.

4. `fusesurgery.load_fused(EXPORT)` (in memory, through the export's key map) against
   `load_fused(FUSED)` of the fused checkpoint it was exported from: whole child processes,
   alternating, each timed around `load_fused` plus one forward of 8 tokens with an image
   (what touches every page), and their peak RssAnon. No target of its own: the export's
   load copies only the decoder's permuted q/k rows (Llama), so the ratio should be near 1
   and the RssAnon peak above the native one by about those rows.

Usage: python benchmarks/bench_export.py [--workdir DIR] [--keep] [--rounds 3]
       [--settle 1.0] [--new-tokens 16] [--decoder-preset llama3_2_1b]
       [--encoder-preset clip_vit_l_14_336] [--parts decode,steps,steps-native]
       [--threads N]
       (develop with: --decoder-preset tiny --encoder-preset tiny_clip --rounds 1)
"""

from __future__ import annotations

import json
import os
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
from bench_validate import fuse_once  # noqa: E402

LOAD = """
import json, sys, time
import torch, transformers
import fusesurgery

transformers.logging.disable_progress_bar()  # import fusesurgery registered the classes
kind, directory, report = sys.argv[1:4]
auto = (transformers.AutoModelForImageTextToText if kind == "export"
        else transformers.AutoModelForCausalLM)
start = time.perf_counter()
model = auto.from_pretrained(directory)
seconds = time.perf_counter() - start
assert sum(p.numel() for p in model.parameters()) > 0
with open(report, "w") as f:
    json.dump({"from_pretrained": seconds}, f)
"""

LOAD_WARM = """
import json, sys, time
import torch, transformers
import fusesurgery

transformers.logging.disable_progress_bar()
export, decoder, rounds, report = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
loaders = {"export": lambda: transformers.AutoModelForImageTextToText.from_pretrained(export),
           "decoder": lambda: transformers.AutoModelForCausalLM.from_pretrained(decoder)}
for load in loaders.values():  # warm-up, untimed
    load()
times = {"export": [], "decoder": []}
for r in range(rounds):
    for name in (("export", "decoder") if r % 2 == 0 else ("decoder", "export")):
        start = time.perf_counter()
        model = loaders[name]()
        times[name].append(time.perf_counter() - start)
        del model
with open(report, "w") as f:
    json.dump(times, f)
"""

DECODE = """
import json, statistics, sys, time
import torch, transformers
import fusesurgery

transformers.logging.disable_progress_bar()
directory, rounds, new_tokens, report = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = transformers.AutoModelForImageTextToText.from_pretrained(directory).eval()
config = model.config
stamps = []
model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
generator = torch.Generator().manual_seed(0)
tokens = torch.randint(0, config.text_vocab_size, (1, 16), generator=generator)
with_image = tokens.clone()
with_image[0, 1] = config.image_token_id
side = config.vision_config.image_size
pixels = torch.randn(1, 3, side, side, generator=generator)
runs = {"image": dict(input_ids=with_image, pixel_values=pixels), "text": dict(input_ids=tokens)}
steps = {"image": [], "text": []}
prefill = {"image": [], "text": []}
with torch.no_grad():
    for name in runs:  # warm-up, untimed: first-call allocations and kernel choices
        model.generate(**runs[name], max_new_tokens=2, min_new_tokens=2, do_sample=False)
    for r in range(rounds):
        for name in (("image", "text") if r % 2 == 0 else ("text", "image")):
            stamps.clear()
            model.generate(**runs[name], max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
            calls = [b - a for a, b in zip(stamps[::2], stamps[1::2])]
            prefill[name].append(calls[0])
            steps[name].append(statistics.median(calls[1:]))
with open(report, "w") as f:
    json.dump({"steps": steps, "prefill": prefill}, f)
"""

STEPS = """
import json, statistics, sys, time
import torch, transformers
import fusesurgery

transformers.logging.disable_progress_bar()
kind, path, rounds, report = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
new_tokens = int(sys.argv[5])
generator = torch.Generator().manual_seed(0)
prompt = 16
token = torch.tensor([[42]])
if kind == "export":
    model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    config = model.config
    tokens = torch.randint(0, config.text_vocab_size, (1, prompt), generator=generator)
    image_id, side = config.image_token_id, config.vision_config.image_size
    images = {"pixel_values": torch.randn(1, 3, side, side, generator=generator)}
else:
    model = fusesurgery.load_fused(path).eval()
    config = model.fused_config
    tokens = torch.randint(0, config.decoder.vocab_size, (1, prompt), generator=generator)
    image_id, side = config.new_tokens[0].id, config.encoder.image_size
    pixels = torch.randn(1, 3, side, side, generator=generator)
    images = {"images": pixels.to(next(model.encoder.parameters()).dtype)}
with_image = tokens.clone()
with_image[0, 1] = image_id
with torch.no_grad():
    if kind == "export":
        caches = {}
        for name, kwargs in (("image", dict(input_ids=with_image, **images)),
                             ("text", dict(input_ids=tokens))):
            caches[name] = transformers.DynamicCache(config=config.text_config)
            model(**kwargs, past_key_values=caches[name], use_cache=True)
        mask = torch.ones(1, prompt + 1, dtype=torch.long)

        def step(name):
            model(input_ids=token, past_key_values=caches[name], use_cache=True,
                  attention_mask=mask)
            caches[name].crop(-1)
    else:  # whole fusesurgery.generate calls, their steps timed by hooks on the model
        from fusesurgery.run.inputs import ModelInputs

        s_e = config.encoder.seq_len
        runs = {"image": ModelInputs(
            tokens=with_image, labels=with_image, padding_mask=torch.ones_like(tokens).bool(),
            encoder_input=images,
            encoder_mask=(torch.arange(prompt) >= 1)[None, :, None].expand(1, prompt, s_e)),
            "text": tokens}
        stamps = []

        def clocks(*_):
            stamps.append((time.perf_counter(), time.process_time()))

        model.register_forward_pre_hook(clocks)
        model.register_forward_hook(clocks)
        steps_per_call = {"image": [], "text": []}

        def step(name):  # every decoding step of a generate of new_tokens tokens
            stamps.clear()
            fusesurgery.generate(model, runs[name], max_new_tokens=new_tokens, eos_ids=())
            calls = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps[::2], stamps[1::2])]
            steps_per_call[name] = calls[1:]  # the first call is the prefill
    for name in ("image", "text") * (2 if kind == "export" else 1):  # warm-up, untimed
        step(name)
    times = {"image": [], "text": []}
    cpu = {"image": [], "text": []}
    for r in range(rounds):
        for name in (("image", "text") if r % 2 == 0 else ("text", "image")):
            start, start_cpu = time.perf_counter(), time.process_time()
            step(name)
            if kind == "export":
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            else:  # the median decoding step of the generate
                times[name].append(statistics.median(w for w, _ in steps_per_call[name]))
                cpu[name].append(statistics.median(c for _, c in steps_per_call[name]))
with open(report, "w") as f:
    json.dump({"times": times, "cpu": cpu, "threads": torch.get_num_threads()}, f)
"""


def main() -> None:
    parser = common_parser(__doc__)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the decode and steps children (default: "
                        "torch's own choice)")
    parser.add_argument("--parts", default="export,load,load-warm,decode,steps,load-fused",
                        help="which measurements to run (comma-separated: export, load, "
                        "load-warm, decode, steps, steps-native, load-fused; the others need "
                        "the export an earlier run left in --workdir, else it is made first)")
    args = parser.parse_args()

    work, temporary = work_directory(args, "export")
    try:
        print(f"inputs in {work}:")
        enc, dec = build_inputs(work, args.decoder_preset, args.encoder_preset)
        fused = work / f"fused-{args.decoder_preset}-{args.encoder_preset}"
        fuse_once(enc, dec, fused)
        from fusesurgery.io import open_checkpoint  # noqa: PLC0415

        with open_checkpoint(fused) as source:
            largest = max(info.nbytes for info in source.infos().values())
        print(f"  {fused.name}: {tree_bytes(fused) / 1e6:.1f} MB, largest tensor "
              f"{largest / 1e6:.0f} MB")
        export, copy = work / "export", work / "copy"
        export_cmd = [CLI, "convert", str(fused), "-o", str(export), "--to", "transformers",
                      "-q"]
        copy_cmd = ["bash", "-c", f"cp -r '{fused}' '{copy}' && cd '{copy}' && find . -type f "
                    f"-exec sync {{}} +"]

        parts = set(args.parts.split(","))
        if "export" in parts or not (export / "config.json").is_file():
            measure_export(args, fused, export, copy, export_cmd, copy_cmd, largest)
        if "load" in parts:
            measure_load(args, work, export, dec)
        if "load-warm" in parts:
            measure_load_warm(args, work, export, dec)
        if "decode" in parts:
            measure_decode(args, work, export)
        if "steps" in parts:
            measure_steps(args, work, "export", export)
        if "steps-native" in parts:
            measure_steps(args, work, "native", fused)
        if "load-fused" in parts:
            measure_load_fused(args, work, export, fused)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure_export(args, fused: Path, export: Path, copy: Path, export_cmd: list[str],
                   copy_cmd: list[str], largest: int) -> None:
    """1. export against cp -r + sync."""
    times: dict[str, list[float]] = {"export": [], "cp": []}
    peaks: list[int] = []
    print(f"\n1. export vs cp -r + sync, {args.rounds} rounds, alternating")
    for r in range(args.rounds):
        order = ("export", "cp") if r % 2 == 0 else ("cp", "export")
        for name in order:
            shutil.rmtree(export if name == "export" else copy, ignore_errors=True)
            same_start([fused], args.settle)
            seconds, peak = run_sampled(export_cmd if name == "export" else copy_cmd)
            times[name].append(seconds)
            if name == "export":
                peaks.append(peak)
        print(f"  round {r + 1} ({order[0]} first): export {times['export'][-1]:.2f} s, "
              f"cp {times['cp'][-1]:.2f} s, ratio "
              f"{times['export'][-1] / times['cp'][-1]:.2f}", flush=True)
    ratios = [e / c for e, c in zip(times["export"], times["cp"], strict=True)]
    bound = 300e6 + largest
    print(f"  export / cp: median of rounds {statistics.median(ratios):.2f} (target <= 1.3: "
          f"{'PASS' if statistics.median(ratios) <= 1.3 else 'FAIL'}); peak RssAnon "
          f"{max(peaks) / 1e6:.0f} MB (bound 300 MB + largest tensor = {bound / 1e6:.0f} "
          f"MB: {'PASS' if max(peaks) <= bound else 'FAIL'})")
    shutil.rmtree(copy, ignore_errors=True)


def measure_load(args, work: Path, export: Path, dec: Path) -> None:
    """2. from_pretrained of the export against the source decoder's."""
    report = work / "bench_export_load.json"
    loads: dict[str, list[float]] = {"export": [], "decoder": []}
    walls: dict[str, list[float]] = {"export": [], "decoder": []}
    print(f"\n2. from_pretrained: export vs the source decoder, {args.rounds} rounds")
    for r in range(args.rounds):
        order = ("export", "decoder") if r % 2 == 0 else ("decoder", "export")
        for name in order:
            same_start([export, dec], args.settle)
            seconds, _ = run_sampled([sys.executable, "-c", LOAD, name,
                                      str(export if name == "export" else dec),
                                      str(report)])
            walls[name].append(seconds)
            loads[name].append(json.loads(report.read_text())["from_pretrained"])
        print(f"  round {r + 1}: from_pretrained export {loads['export'][-1]:.2f} s, "
              f"decoder {loads['decoder'][-1]:.2f} s (whole processes "
              f"{walls['export'][-1]:.2f} s, {walls['decoder'][-1]:.2f} s)", flush=True)
    load_ratio = statistics.median(e / d for e, d in zip(loads["export"], loads["decoder"],
                                                         strict=True))
    wall_ratio = statistics.median(e / d for e, d in zip(walls["export"], walls["decoder"],
                                                         strict=True))
    size_ratio = tree_bytes(export) / tree_bytes(dec)
    print(f"  export / decoder: from_pretrained median {load_ratio:.2f}, whole process "
          f"{wall_ratio:.2f}; bytes {size_ratio:.2f}; target <= {size_ratio * 1.2:.2f}: "
          f"{'PASS' if load_ratio <= size_ratio * 1.2 else 'FAIL'}")


def measure_load_warm(args, work: Path, export: Path, dec: Path) -> None:
    """2b. from_pretrained of the export and of the decoder, alternating in one warm process
    (after one untimed load of each): what repeated loads in a notebook cost."""
    report = work / "bench_export_load_warm.json"
    rounds = max(args.rounds, 5)
    print(f"\n2b. from_pretrained in one warm process: export vs decoder, {rounds} rounds")
    subprocess.run([sys.executable, "-c", LOAD_WARM, str(export), str(dec), str(rounds),
                    str(report)], check=True)
    times = json.loads(report.read_text())
    ratios = [e / d for e, d in zip(times["export"], times["decoder"], strict=True)]
    for r, ratio in enumerate(ratios):
        print(f"  round {r + 1}: export {times['export'][r]:.3f} s, decoder "
              f"{times['decoder'][r]:.3f} s, ratio {ratio:.2f}")
    print(f"  export / decoder in one process: median of rounds {statistics.median(ratios):.2f}")


LOAD_FUSED = """
import json, sys, time
import torch
import fusesurgery

path, report = sys.argv[1], sys.argv[2]
start = time.perf_counter()
model = fusesurgery.load_fused(path)
loaded = time.perf_counter() - start
encoder = model.fused_config.encoder
image = model.fused_config.new_tokens[0].id
ids = torch.tensor([[1, image, 5, 7, 9, 11, 13, 15]])
with torch.no_grad():
    pixels = torch.zeros(1, 3, encoder.image_size, encoder.image_size,
                         dtype=next(model.encoder.parameters()).dtype)
    model(ids, encoder_input={"images": pixels},
          encoder_mask=torch.ones(1, 8, encoder.seq_len, dtype=torch.bool))
json.dump({"load_fused": loaded, "with_forward": time.perf_counter() - start},
          open(report, "w"))
"""


def measure_load_fused(args, work: Path, export: Path, fused: Path) -> None:
    """4. load_fused of the export against load_fused of the fused checkpoint."""
    report = work / "bench_export_load_fused.json"
    times: dict[str, list[float]] = {"export": [], "fused": []}
    peaks: dict[str, list[int]] = {"export": [], "fused": []}
    print(f"\n4. load_fused: the export vs the fused checkpoint, {args.rounds} rounds")
    for r in range(args.rounds):
        order = ("export", "fused") if r % 2 == 0 else ("fused", "export")
        for name in order:
            same_start([export, fused], args.settle)
            _, peak = run_sampled([sys.executable, "-c", LOAD_FUSED,
                                   str(export if name == "export" else fused), str(report)])
            times[name].append(json.loads(report.read_text())["with_forward"])
            peaks[name].append(peak)
        print(f"  round {r + 1}: export {times['export'][-1]:.2f} s "
              f"({peaks['export'][-1] / 1e6:.0f} MB RssAnon), fused {times['fused'][-1]:.2f} s "
              f"({peaks['fused'][-1] / 1e6:.0f} MB)", flush=True)
    ratio = statistics.median(e / f for e, f in zip(times["export"], times["fused"],
                                                    strict=True))
    print(f"  export / fused: load_fused + one forward, median of rounds {ratio:.2f}; peak "
          f"RssAnon medians {statistics.median(peaks['export']) / 1e6:.0f} MB vs "
          f"{statistics.median(peaks['fused']) / 1e6:.0f} MB")


def measure_decode(args, work: Path, export: Path) -> None:
    """3. cost per new token with an image and without."""
    report = work / "bench_export_decode.json"
    print(f"\n3. cost per new token, {args.rounds} rounds of {args.new_tokens} tokens")
    subprocess.run([sys.executable, "-c", DECODE, str(export), str(args.rounds),
                    str(args.new_tokens), str(report)], check=True, env=_threads_env(args))
    decode = json.loads(report.read_text())
    steps, prefill = decode["steps"], decode["prefill"]
    per_round = [i / t for i, t in zip(steps["image"], steps["text"], strict=True)]
    for r, ratio in enumerate(per_round):
        print(f"  round {r + 1}: per new token with an image {steps['image'][r] * 1e3:.1f} "
              f"ms, without {steps['text'][r] * 1e3:.1f} ms, ratio {ratio:.2f} (prefill "
              f"{prefill['image'][r]:.2f} s with the tower, {prefill['text'][r]:.2f} s)")
    median = statistics.median(per_round)
    print(f"  with / without an image: median of rounds {median:.2f} (target <= 1.2: "
          f"{'PASS' if median <= 1.2 else 'FAIL'})")



def _threads_env(args) -> dict[str, str]:
    """The environment of a decoding child: ``--threads`` as its OMP_NUM_THREADS (torch's
    intra-op threads) when given. One thread is far less exposed to a busy machine: a
    parallel region waits for its slowest thread, and on shared cores that is one the
    scheduler has put aside."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def measure_steps(args, work: Path, kind: str, path: Path) -> None:
    """3b. single decoding steps with and without an image, alternating in one process."""
    report = work / f"bench_export_steps_{kind}.json"
    rounds = max(args.rounds, 15) if kind == "export" else args.rounds
    label = ("single decoding steps of the export" if kind == "export" else
             f"fusesurgery.generate of load_fused(FUSED), {args.new_tokens} tokens each,")
    print(f"\n3b. {label} in one warm process, {rounds} rounds")
    subprocess.run([sys.executable, "-c", STEPS, kind, str(path), str(rounds), str(report),
                    str(args.new_tokens)], check=True, env=_threads_env(args))
    measured = json.loads(report.read_text())
    times = measured["times"]
    ratios = [i / t for i, t in zip(times["image"], times["text"], strict=True)]
    image, text = times["image"], times["text"]
    print(f"  {measured['threads']} threads; step with an image median "
          f"{statistics.median(image) * 1e3:.1f} ms (min {min(image) * 1e3:.1f}), without "
          f"{statistics.median(text) * 1e3:.1f} ms (min {min(text) * 1e3:.1f}); per-round "
          f"ratios {min(ratios):.2f}-{max(ratios):.2f}")
    print(f"  with / without an image: median of rounds {statistics.median(ratios):.3f} "
          f"(target <= 1.2: {'PASS' if statistics.median(ratios) <= 1.2 else 'FAIL'})")
    if measured["threads"] == 1:  # the process's CPU time is then the step's own work
        cpu = measured["cpu"]
        cpu_ratios = [i / t for i, t in zip(cpu["image"], cpu["text"], strict=True)]
        print(f"  CPU time of a step (what a busy machine's other work does not add): with an "
              f"image median {statistics.median(cpu['image']) * 1e3:.1f} ms, without "
              f"{statistics.median(cpu['text']) * 1e3:.1f} ms; median of the rounds' ratios "
              f"{statistics.median(cpu_ratios):.3f} ({min(cpu_ratios):.2f}-"
              f"{max(cpu_ratios):.2f})")


if __name__ == "__main__":
    main()
