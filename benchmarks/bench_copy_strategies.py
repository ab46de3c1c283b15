"""The ways of moving a checkpoint's bytes that the converter chose between, timed side by side
on a Llama-3.2-1B-shaped bf16 safetensors file (2.47 GB, real data).

Whole-file copies (the data of an HF -> native conversion, apart from q/k):
- `cp`-like: copy_file_range from offset 0, as few calls as the kernel allows (what a mirrored
  shard does, see fusesurgery.write.safetensors_writer._write_mirror);
- the same in 256 MiB calls;
- from the first tensor on, 16808 bytes in (424 bytes into a page, as in the file), in as few
  calls as possible (what a tensor-by-tensor write of the data costs at best);
- mmap + write.

Gathering the RoPE-permuted q/k rows (32 tensors, 160 MB):
- writev from a read-only mapping of the source (what the writer does);
- preadv scattered into a reused buffer, then write;
- one copy_file_range per row.

Contenders alternate within each round, each from the same start (see bench_convert.same_start).

Usage: python benchmarks/bench_copy_strategies.py [--workdir DIR] [--rounds 4]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_convert import make_hf_checkpoint, same_start  # noqa: E402

from fusesurgery.convert.transforms import row_order  # noqa: E402
from fusesurgery.io import PermutedRegion, open_checkpoint  # noqa: E402
from fusesurgery.write.safetensors_writer import _write_permuted  # noqa: E402

CHUNK = 256 * 2**20
MAX_CALL = 2**31 - 4096


def copy_range(source: int, out: int, start: int, end: int, step: int) -> None:
    position = start
    while position < end:
        position += os.copy_file_range(source, out, min(step, end - position), position)


def whole_file(step: int, start_at_data: bool) -> Callable[[Path, Path], None]:
    def run(src: Path, dst: Path) -> None:
        size = src.stat().st_size
        with open(src, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        source, out = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT)
        try:
            start = data_start if start_at_data else 0
            os.write(out, b" " * start)
            copy_range(source, out, start, size, step)
        finally:
            os.close(source)
            os.close(out)
    return run


def mmap_write(src: Path, dst: Path) -> None:
    with open(src, "rb") as f, open(dst, "wb") as out:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            for start in range(0, len(view), CHUNK):
                out.write(view[start:start + CHUNK])
            view.release()


def permuted_regions(src: Path) -> list[PermutedRegion]:
    regions = []
    with open_checkpoint(src) as source:
        for key in source.keys():
            for name, heads in (("q_proj", 32), ("k_proj", 8)):
                if key.endswith(f"self_attn.{name}.weight"):
                    rows = source.info(key).shape[0]
                    order = row_order(("permute_qk_to_native", heads, 64), rows)
                    regions.append(PermutedRegion(source.file_region(key), order))
    return regions


def gather_writev(regions: list[PermutedRegion]) -> Callable[[Path, Path], None]:
    def run(src: Path, dst: Path) -> None:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT)
        try:
            for region in regions:
                _write_permuted(out, region)
        finally:
            os.close(out)
    return run


def gather_preadv(regions: list[PermutedRegion]) -> Callable[[Path, Path], None]:
    buffer = memoryview(bytearray(max(region.nbytes for region in regions)))

    def run(src: Path, dst: Path) -> None:
        source, out = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT)
        try:
            for region in regions:
                size, rows = region.row_bytes, len(region.row_order)
                where = [0] * rows  # source row -> output row
                for output_row, source_row in enumerate(region.row_order):
                    where[source_row] = output_row
                targets = [buffer[where[r] * size:(where[r] + 1) * size] for r in range(rows)]
                position = region.region.offset
                for first in range(0, rows, 1024):
                    position += os.preadv(source, targets[first:first + 1024], position)
                os.write(out, buffer[:region.nbytes])
        finally:
            os.close(source)
            os.close(out)
    return run


def gather_copy_per_row(regions: list[PermutedRegion]) -> Callable[[Path, Path], None]:
    def run(src: Path, dst: Path) -> None:
        source, out = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT)
        try:
            for region in regions:
                size, base = region.row_bytes, region.region.offset
                for row in region.row_order:
                    os.copy_file_range(source, out, size, base + row * size)
        finally:
            os.close(source)
            os.close(out)
    return run


def compare(title: str, contenders: dict[str, Callable[[Path, Path], None]], src: Path,
            work: Path, rounds: int, settle: float) -> None:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_number in range(rounds):
        order = list(contenders) if round_number % 2 == 0 else list(reversed(contenders))
        for name in order:
            out = work / "out"
            same_start(src.parent, settle)
            start = time.perf_counter()
            contenders[name](src, out)
            times[name].append(time.perf_counter() - start)
            out.unlink()
    print(title)
    baseline = min(times[next(iter(contenders))])
    for name, values in times.items():
        print(f"  {name:44s} best {min(values):6.3f} s  median {statistics.median(values):6.3f} s  "
              f"best vs first {baseline / min(values):5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--settle", type=float, default=1.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fusesurgery-bench-", dir=args.workdir))
    try:
        make_hf_checkpoint(work / "hf", "llama3_2_1b")
        src = work / "hf" / "model.safetensors"
        compare("whole file (2.47 GB)", {
            "copy_file_range from 0, fewest calls": whole_file(MAX_CALL, False),
            "copy_file_range from 0, 256 MiB calls": whole_file(CHUNK, False),
            "copy_file_range from the data (424 in a page)": whole_file(MAX_CALL, True),
            "mmap + write": mmap_write,
        }, src, work, args.rounds, args.settle)
        regions = permuted_regions(src)
        compare(f"RoPE q/k rows ({len(regions)} tensors, "
                f"{sum(r.nbytes for r in regions) / 1e6:.0f} MB)", {
            "writev from a mapping": gather_writev(regions),
            "preadv into a reused buffer + write": gather_preadv(regions),
            "copy_file_range per row": gather_copy_per_row(regions),
        }, src, work, args.rounds, args.settle)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
