"""`fusesurgery push` as a user runs it (whole process, imports included) against `hf upload`,
the command a user would otherwise run, both talking to the local fake Hub of the test suite
(tests/hub_server.py, the real huggingface_hub client on both sides, no Xet).

The fused checkpoint is built once by `fusesurgery fuse` from a decoder and a vision tower of
the chosen presets (random bf16 data, HF layout; default a Qwen2-0.5B-shaped decoder and a tiny
CLIP, about 1 GB). Each round runs, in an order rotated from round to round:

- `fusesurgery push OUT ns/repo --quick`: header-level validation, card, one commit;
- `fusesurgery push OUT ns/repo`: the same with validate's forward checks;
- `hf upload ns/repo OUT`: the upload alone (no validation, no card);
- `fusesurgery push OUT ns/repo --dry-run`: validation and card, no network.

Each run goes to a fresh repo and the server forgets every stored object between runs, so no
contender gains from the Hub's deduplication of an object already uploaded. Reported: the median
wall time of each contender, its MB/s over the checkpoint's bytes, and the median over rounds
of its ratio to `hf upload`. The fake Hub keeps objects in memory, so it runs on loopback at
memory speed; against huggingface.co the upload dominates and the ratios move towards 1.

Usage: python benchmarks/bench_push.py [--rounds 3] [--decoder-preset qwen2_0_5b]
       [--encoder-preset tiny_clip] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_fuse import build_inputs, tree_bytes  # noqa: E402
from bench_startup import run_once  # noqa: E402

from tests.hub_server import FakeHub  # noqa: E402

CLI = str(Path(sys.executable).with_name("fusesurgery"))
HF = str(Path(sys.executable).with_name("hf"))
TOKEN = "hf_bench_write"


def child_env(hub: FakeHub, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(home), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decoder-preset", default="qwen2_0_5b")
    parser.add_argument("--encoder-preset", default="tiny_clip")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_push_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"inputs in {work}:")
        enc, dec = build_inputs(work, args.decoder_preset, args.encoder_preset)
        out = work / "fused"
        if not (out / "fusion_config.json").exists():
            subprocess.run([CLI, "fuse", str(enc), str(dec), "-o", str(out), "--overwrite"],
                           check=True, capture_output=True)
        size = tree_bytes(out)
        print(f"  fused: {size / 1e6:.1f} MB in {sum(1 for p in out.rglob('*') if p.is_file())}"
              " files")
        with FakeHub({TOKEN: {"name": "bench", "write": True}}) as hub:
            env = child_env(hub, work / "hf_home")
            contenders = {
                "push --quick": lambda repo: [CLI, "push", str(out), repo, "--quick"],
                "push (full validate)": lambda repo: [CLI, "push", str(out), repo],
                "hf upload": lambda repo: [HF, "upload", repo, str(out), "--quiet"],
                "push --dry-run": lambda repo: [CLI, "push", str(out), repo, "--dry-run"],
            }
            names = list(contenders)
            times: dict[str, list[float]] = {name: [] for name in names}
            count = 0
            for round_index in range(args.rounds):
                order = names[round_index % len(names):] + names[:round_index % len(names)]
                for name in order:
                    count += 1
                    repo = f"bench/run-{count}"
                    times[name].append(run_once(contenders[name](repo), env))
                    hub.repos.pop(repo, None)  # forget what was stored: no deduplication
                    hub.lfs_objects.clear()
                print(f"round {round_index + 1}: " + ", ".join(
                    f"{name} {times[name][-1]:.2f} s" for name in names))
        print(f"\n{'contender':<22} {'median s':>9} {'MB/s':>8} {'x hf upload':>12}")
        for name in names:
            median = statistics.median(times[name])
            ratio = statistics.median(
                a / b for a, b in zip(times[name], times["hf upload"], strict=True))
            rate = "" if name.endswith("dry-run") else f"{size / 1e6 / median:8.1f}"
            print(f"{name:<22} {median:9.2f} {rate:>8} {ratio:12.2f}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
