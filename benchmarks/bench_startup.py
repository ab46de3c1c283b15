"""Whole-process start-up: `fusesurgery --help`, `-V`, header-only `inspect` and key-level
`diff` of a Llama-3.1-405B-shaped checkpoint, against `python -c pass` and
`python -c "import torch"` (what every command paid before torch was imported lazily).

The checkpoint is the sparse one of bench_inspect_diff.py (every tensor in the header, data
regions that are holes, so 812 GB apparent and no disk cost), in Hugging Face layout with its
config.json, twice, so `diff A B` compares keys, shapes and dtypes (too big for values). And
`inspect` and key-level `diff` of a fused directory (the bundled examples fused: `inspect`
reads its gate values, from the files' bytes, without torch; issue 19).

Each round runs every contender once as a fresh process, in an order rotated from round to
round, so a slow moment of a shared machine falls on all of them; a contender's figure is its
median time and the median over rounds of its ratio to each baseline. Target: each fusesurgery
row under 0.5 s.
Usage: python benchmarks/bench_startup.py [--rounds 7] [--preset llama3_1_405b]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fusesurgery.config import preset
from fusesurgery.convert import layout_tensor_infos
from fusesurgery.convert.configs import hf_config_dict
from fusesurgery.testing import write_sparse_sharded_safetensors

TARGET_S = 0.5


def fusesurgery_command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m fusesurgery``."""
    script = Path(sys.executable).with_name("fusesurgery")
    if script.exists():
        return [str(script)]
    found = shutil.which("fusesurgery")
    return [found] if found else [sys.executable, "-m", "fusesurgery"]


def build_checkpoint(directory: Path, preset_name: str) -> None:
    """A sparse HF-layout checkpoint of ``preset_name`` with its config.json."""
    config = preset(preset_name)
    write_sparse_sharded_safetensors(directory, layout_tensor_infos(config, "hf"))
    (directory / "config.json").write_text(json.dumps(hf_config_dict(config)))


def run_once(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of one whole process (exits with its stderr if it fails; a diff's exit
    1, "different", is a success)."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 and not (done.returncode == 1 and "diff" in argv):
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3_1_405b")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    cli = fusesurgery_command()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        for directory in (a, b):
            build_checkpoint(directory, args.preset)
        examples = Path(__file__).resolve().parents[1] / "examples"
        fused = Path(tmp) / "fused"
        subprocess.run([*cli, "fuse", str(examples / "tiny-clip-vision"),
                        str(examples / "tiny-llama"), "-o", str(fused), "--every", "2", "-q"],
                       check=True, stdout=subprocess.DEVNULL)
        apparent = sum(f.stat().st_size for f in a.iterdir()) / 1e9
        print(f"{args.preset}: {len(list(a.glob('*.safetensors')))} shards, {apparent:.0f} GB "
              f"apparent per copy; {args.rounds} rounds; command: {' '.join(cli)}")
        baselines = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        }
        contenders = {
            "fusesurgery --help": [*cli, "--help"],
            "fusesurgery -V": [*cli, "-V"],
            "fusesurgery inspect BIG": [*cli, "inspect", str(a)],
            "fusesurgery diff BIG BIG2": [*cli, "diff", str(a), str(b)],
            "fusesurgery inspect FUSED": [*cli, "inspect", str(fused)],
            "fusesurgery diff DEC FUSED": [*cli, "diff", str(examples / "tiny-llama"),
                                           str(fused), "--no-values"],
        }
        everything = {**baselines, **contenders}
        names = list(everything)
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in names:  # one unmeasured run each: page cache, .pyc files
            run_once(everything[name])
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(run_once(everything[name]))

    pass_name, torch_name = baselines
    header = (f"{'process':<28} {'median s':>9} {'best s':>8} {'/ python':>9} "
              f"{'/ import torch':>15}")
    print(header)
    for name in names:
        rounds = times[name]
        vs_pass = statistics.median(t / p for t, p in zip(rounds, times[pass_name], strict=True))
        vs_torch = statistics.median(
            t / p for t, p in zip(rounds, times[torch_name], strict=True))
        verdict = ""
        if name in contenders:
            verdict = "  ok" if statistics.median(rounds) < TARGET_S else "  OVER 0.5 s"
        print(f"{name:<28} {statistics.median(rounds):>9.3f} {min(rounds):>8.3f} "
              f"{vs_pass:>8.1f}x {vs_torch:>14.2f}x{verdict}")


if __name__ == "__main__":
    main()
