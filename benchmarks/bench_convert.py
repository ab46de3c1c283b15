"""HF -> native conversion of a Llama-3.2-1B-shaped bf16 checkpoint (random data, real files),
against `cp` of the same files in the same run, with the converter's peak anonymous memory.

The claim checked: conversion runs at >= 0.7x the speed of `cp`, and its peak anonymous RSS
(RssAnon, not ru_maxrss, which counts mapped file pages) stays under 2x the largest tensor +
300 MB. `cp` leaves its data in the page cache, like `convert_checkpoint(durable=False)`; the
default `durable=True` fsyncs before the output appears, which compares with `cp` + `sync`.
Tensors whose bytes do not change are copied in the kernel (copy_file_range); only the RoPE
q/k permutations pass through user space.

Usage: python benchmarks/bench_convert.py [--workdir DIR] [--preset llama3_2_1b] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fusesurgery.config import preset
from fusesurgery.convert import layout_tensor_infos
from fusesurgery.convert.configs import hf_config_dict
from fusesurgery.write import write_safetensors


def rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def make_hf_checkpoint(path: Path, name: str) -> int:
    """Write a random bf16 HF-layout checkpoint; return its largest tensor's size in bytes."""
    config = preset(name)
    infos = list(layout_tensor_infos(config, "hf", dtype=torch.bfloat16).values())
    generator = torch.Generator().manual_seed(0)
    write_safetensors(
        path, infos,
        lambda key: torch.randn(next(i.shape for i in infos if i.name == key),
                                generator=generator, dtype=torch.bfloat16),
        extra_files={"config.json": json.dumps(hf_config_dict(config))},
    )
    return max(info.nbytes for info in infos)


def convert_in_child(src: Path, dst: Path, durable: bool) -> dict:
    """Run the conversion in a fresh process that samples its own RssAnon every 5 ms."""
    code = f"""
import json, threading, time
from pathlib import Path
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_convert import rss_anon_bytes
from fusesurgery.write import convert_checkpoint
base = rss_anon_bytes(); peak = [base]; done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon_bytes()); time.sleep(0.005)
t = threading.Thread(target=sample, daemon=True); t.start()
start = time.perf_counter()
convert_checkpoint({str(src)!r}, {str(dst)!r}, durable={durable!r})
seconds = time.perf_counter() - start
done.set(); t.join()
print(json.dumps({{"seconds": seconds, "baseline": base, "peak": peak[0]}}))
"""
    os.sync()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_cp(src: Path, dst: Path, sync: bool) -> float:
    os.sync()  # no writeback of an earlier contender's dirty pages during this one
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    if sync:
        subprocess.run(["sync", *map(str, dst.iterdir())], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--preset", default="llama3_2_1b")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fusesurgery-bench-", dir=args.workdir))
    try:
        src = work / "hf"
        largest = make_hf_checkpoint(src, args.preset)
        size = sum(f.stat().st_size for f in src.iterdir())
        print(f"{args.preset}: {size / 1e9:.2f} GB bf16, largest tensor {largest / 1e6:.0f} MB")
        time_cp(src, work / "warm", sync=False)  # page cache warm for every contender
        shutil.rmtree(work / "warm")
        cp_times, cp_sync_times, conv_times, conv_durable_times, peaks = [], [], [], [], []
        for i in range(args.repeats):
            cp_times.append(time_cp(src, work / f"cp{i}", sync=False))
            shutil.rmtree(work / f"cp{i}")
            cp_sync_times.append(time_cp(src, work / f"cps{i}", sync=True))
            shutil.rmtree(work / f"cps{i}")
            for durable, times in ((False, conv_times), (True, conv_durable_times)):
                result = convert_in_child(src, work / f"native{i}", durable)
                shutil.rmtree(work / f"native{i}")
                times.append(result["seconds"])
                peaks.append(result["peak"] - result["baseline"])
        cp_t, cps_t, peak = min(cp_times), min(cp_sync_times), max(peaks)
        conv_t, convd_t = min(conv_times), min(conv_durable_times)
        limit = 2 * largest + 300e6
        print(f"cp          {cp_t:7.2f} s  {size / cp_t / 1e9:6.2f} GB/s")
        print(f"cp + sync   {cps_t:7.2f} s  {size / cps_t / 1e9:6.2f} GB/s")
        print(f"convert     {conv_t:7.2f} s  {size / conv_t / 1e9:6.2f} GB/s  (durable=False)")
        print(f"convert     {convd_t:7.2f} s  {size / convd_t / 1e9:6.2f} GB/s  (durable=True, "
              "fsync)")
        print(f"speed ratio convert/cp                 {cp_t / conv_t:.2f}  (target >= 0.7)")
        print(f"speed ratio durable convert/(cp+sync)  {cps_t / convd_t:.2f}")
        print(f"peak RssAnon growth {peak / 1e6:.0f} MB; limit 2 x largest + 300 MB = "
              f"{limit / 1e6:.0f} MB; ratio {peak / limit:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
