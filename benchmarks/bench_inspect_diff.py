"""Header-only speed: `inspect` and key-level `diff` on a Llama-3.1-405B-shaped sharded
checkpoint made of sparse files (valid safetensors headers, data regions that are holes, so
812 GB apparent and no disk cost).

Prints the best and median wall time of each operation over N runs (target: under 1 s each).
Usage: python benchmarks/bench_inspect_diff.py [--repeats 5] [--preset llama3_1_405b]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fusesurgery.config import preset
from fusesurgery.convert import layout_tensor_infos
from fusesurgery.reports import diff_checkpoints, inspect_checkpoint
from fusesurgery.testing import write_sparse_sharded_safetensors


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


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


if __name__ == "__main__":
    main()
