"""Reading a transformers export (`convert --to transformers`) in memory, against the way it
was read before: `generate` and `validate` of an export, whole processes (imports included),
on the bundled examples (`examples/tiny-clip-vision` + `examples/tiny-llama`, fused every 2nd
layer, the gates opened to 0.7 as after training, then exported), which carry the tokenizer
`generate` needs.

Contenders, alternating which goes first each round, the median of the per-round ratios:

1. generate: `fusesurgery generate EXPORT --image IMG --prompt P --max-new-tokens N`
   against what an export needed before it read one: `fusesurgery convert EXPORT --to native
   -o NAT` then `fusesurgery generate NAT ...` (both timed, summed). The two must print the
   same tokens (checked).
2. validate: `fusesurgery validate EXPORT` with this checkout against the same command with
   `--baseline-src DIR` (an older checkout, e.g. `git worktree add DIR <commit>`) on
   PYTHONPATH, which wrote the export back to the native layout in a temporary directory
   before checking it. Skipped without `--baseline-src`.

For each run: wall seconds, peak RssAnon (sampled every ~20 ms from /proc/PID/status), and
the disk it wrote: the largest size its `TMPDIR` (a fresh directory per run) reached, sampled
the same way, plus the size of any output it was asked to write (`NAT`), plus the child's
`write_bytes` from /proc/PID/io at its last sample. No target: the claim is that reading an
export writes nothing (0 bytes against one native copy of the export), and the times are
reported as they come.

Usage: python benchmarks/bench_export_readers.py [--rounds 3] [--new-tokens 8]
       [--baseline-src DIR] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

CLI = str(Path(sys.executable).with_name("fusesurgery"))
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SAMPLE_SECONDS = 0.02


def _tree_bytes(path: Path) -> int:
    try:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except FileNotFoundError:  # a file renamed or removed while walked
        return 0


def _proc_field(pid: int, name: str, key: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/{name}").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return None


def run_measured(argv: list[str], env: dict[str, str]) -> dict:
    """Run ``argv``: wall seconds, peak RssAnon, peak size of its TMPDIR, last write_bytes,
    and its stdout."""
    scratch = Path(env["TMPDIR"])
    peak = {"rss": 0, "tmp": 0, "written": 0}
    done = threading.Event()
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)

    def sample() -> None:
        while not done.is_set():
            rss = _proc_field(child.pid, "status", "RssAnon:")
            if rss is not None:
                peak["rss"] = max(peak["rss"], rss * 1024)
            written = _proc_field(child.pid, "io", "write_bytes:")
            if written is not None:
                peak["written"] = max(peak["written"], written)
            peak["tmp"] = max(peak["tmp"], _tree_bytes(scratch))
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = child.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if child.returncode not in (0, 1):  # validate exits 1 when a check fails: reported
        raise RuntimeError(f"{' '.join(argv)} exited {child.returncode}:\n{out}\n{err}")
    return {"seconds": seconds, **peak, "stdout": out, "rc": child.returncode}


def environment(work: Path, pythonpath: str | None) -> dict[str, str]:
    scratch = Path(tempfile.mkdtemp(prefix="tmpdir-", dir=work))
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def build_export(work: Path) -> tuple[Path, Path]:
    """The examples fused, gates opened, exported; and a test image."""
    from PIL import Image

    import fusesurgery
    from fusesurgery.hf import export_transformers

    fused, gated, export = work / "fused", work / "gated", work / "export"
    for path in (fused, gated, export):
        shutil.rmtree(path, ignore_errors=True)
    fusesurgery.fuse(EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama", fused, every=2)
    model = fusesurgery.load_fused(fused)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ca_scale.scale", "mlp_scale.scale")):
                param.fill_(0.7)
    fusesurgery.save_fused(model, gated)
    export_transformers(gated, export)
    image = work / "image.png"
    pixels = torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.numpy()).save(image)
    return export, image


def _cleanup(env: dict[str, str], *paths: Path) -> None:
    shutil.rmtree(env["TMPDIR"], ignore_errors=True)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def generate_round(work: Path, export: Path, image: Path, new_tokens: int,
                   in_memory_first: bool) -> tuple[dict, dict]:
    args = ["--image", str(image), "--prompt", "word7 <|image|> word8", "--max-new-tokens",
            str(new_tokens), "--json"]
    native = work / "native"

    def in_memory() -> dict:
        env = environment(work, os.environ.get("PYTHONPATH"))
        result = run_measured([CLI, "generate", str(export), *args], env)
        _cleanup(env)
        return result

    def via_native() -> dict:
        env = environment(work, os.environ.get("PYTHONPATH"))
        convert = run_measured([CLI, "convert", str(export), "--to", "native", "-o",
                                str(native), "-q"], env)
        written = _tree_bytes(native)
        run = run_measured([CLI, "generate", str(native), *args], env)
        _cleanup(env, native)
        return {"seconds": convert["seconds"] + run["seconds"],
                "rss": max(convert["rss"], run["rss"]),
                "tmp": max(convert["tmp"], run["tmp"]) + written,
                "written": convert["written"] + run["written"], "stdout": run["stdout"]}

    first, second = (in_memory, via_native) if in_memory_first else (via_native, in_memory)
    a, b = first(), second()
    ours, theirs = (a, b) if in_memory_first else (b, a)
    if json.loads(ours["stdout"])["new_ids"] != json.loads(theirs["stdout"])["new_ids"]:
        raise RuntimeError("generate of the export and of its native copy differ")
    return ours, theirs


def validate_round(work: Path, export: Path, baseline: str,
                   ours_first: bool) -> tuple[dict, dict]:
    def run(pythonpath: str | None) -> dict:
        env = environment(work, pythonpath)
        result = run_measured([CLI, "validate", str(export), "--json"], env)
        _cleanup(env)
        return result

    here = os.environ.get("PYTHONPATH")
    if ours_first:
        ours = run(here)
        return ours, run(baseline)
    theirs = run(baseline)
    return run(here), theirs


def _line(name: str, result: dict) -> str:
    return (f"    {name:<28} {result['seconds']:6.2f} s  RssAnon {result['rss'] / 1e6:6.1f} MB  "
            f"disk (tmp peak + output) {result['tmp'] / 1e3:8.1f} kB  write_bytes "
            f"{result['written'] / 1e3:8.1f} kB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--baseline-src", default=None,
                        help="an older checkout for validate's baseline (PYTHONPATH)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fusesurgery-bench-readers-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        export, image = build_export(work)
        print(f"export {export}: {_tree_bytes(export) / 1e3:.1f} kB; load "
              f"{os.getloadavg()[0]:.1f}")
        ratios: dict[str, list[float]] = {"generate": [], "validate": []}
        for i in range(args.rounds):
            print(f"round {i + 1}:")
            ours, theirs = generate_round(work, export, image, args.new_tokens, i % 2 == 0)
            print(_line("generate EXPORT", ours))
            print(_line("convert --to native + gen.", theirs))
            ratios["generate"].append(ours["seconds"] / theirs["seconds"])
            if args.baseline_src:
                ours, theirs = validate_round(work, export, args.baseline_src, i % 2 == 1)
                print(_line("validate EXPORT (in memory)", ours))
                print(_line("validate EXPORT (baseline)", theirs))
                if ours["rc"] != 0 or theirs["rc"] != 0:
                    print(f"    validate exit codes: {ours['rc']} vs {theirs['rc']}")
                ratios["validate"].append(ours["seconds"] / theirs["seconds"])
        for name, values in ratios.items():
            if values:
                print(f"{name}: median of the per-round time ratios (in memory / before) "
                      f"{statistics.median(values):.2f} (rounds "
                      f"{', '.join(f'{v:.2f}' for v in values)}); load "
                      f"{os.getloadavg()[0]:.1f}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
