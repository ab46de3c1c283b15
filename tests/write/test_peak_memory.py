"""Peak memory while writing is about one tensor, not one shard or the whole model."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from fusesurgery.io.tensor_info import TensorInfo
from fusesurgery.write import write_safetensors

MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    # Writing "5" resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def test_peak_rss_growth_is_about_one_tensor(tmp_path):
    try:
        _reset_peak_rss()
        _status_kib("VmHWM")
    except (OSError, KeyError):
        pytest.skip("needs Linux /proc/self/clear_refs and VmHWM")

    # Above glibc's largest mmap threshold (32 MiB), so each tensor is its own mapping and is
    # returned to the OS when freed: RSS then reflects what is alive, not allocator caching.
    tensor_bytes, count = 48 * MIB, 5
    numel = tensor_bytes // 4
    infos = [TensorInfo(f"layers.{i}.weight", (numel,), torch.float32) for i in range(count)]

    def fresh_tensor(name: str) -> torch.Tensor:
        # A new anonymous allocation each time, as a converter producing tensors would make.
        return torch.full((numel,), float(name.split(".")[1]))

    gc.collect()
    _reset_peak_rss()
    baseline_kib = _status_kib("VmRSS")
    result = write_safetensors(tmp_path / "out", infos, fresh_tensor, max_shard_size="1GB")
    growth = (_status_kib("VmHWM") - baseline_kib) * 1024

    assert not result.plan.is_sharded  # all 240 MiB go into one shard
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > count * tensor_bytes
    # The measurement sees allocations at all (else the bound below would prove nothing)...
    assert growth >= 0.9 * tensor_bytes
    # ...and stays below two tensors (measured: ~49 MiB), so even one extra copy of a tensor,
    # let alone the shard (5 tensors) or a shard-sized buffer (>= 240 MiB), would fail it.
    assert growth < 1.75 * tensor_bytes, f"peak RSS grew by {growth / MIB:.0f} MiB"
