"""Fixtures of the transformers-export tests: the bundled examples fused (``fused_example``),
with every gate opened as training would, and exported with ``convert --to transformers``."""

from pathlib import Path

import pytest
import torch

GATE_SUFFIXES = ("ca_scale.scale", "mlp_scale.scale")


def open_gates(fused: Path, out: Path, value: float = 0.7) -> Path:
    """A copy of a fused checkpoint with every gate at ``value`` (as after training)."""
    import fusesurgery

    model = fusesurgery.load_fused(fused)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(GATE_SUFFIXES):
                param.fill_(value)
    fusesurgery.save_fused(model, out)
    return out


def mapped_keys(model: torch.nn.Module, directory: Path) -> set[str]:
    """The state-dict keys whose tensors lie in a file of ``directory`` mapped into this
    process (views of the file, no copies)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith(f"{directory}/"):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return {key for key, tensor in model.state_dict().items()
            if any(low <= tensor.data_ptr() < high for low, high in ranges)}


@pytest.fixture(scope="session")
def gated_example(fused_example, tmp_path_factory) -> Path:
    """``fused_example`` with its gates open (the native fused checkpoint)."""
    return open_gates(fused_example, tmp_path_factory.mktemp("gated") / "fused")


@pytest.fixture(scope="session")
def gated_export(gated_example, tmp_path_factory) -> Path:
    """``gated_example`` exported as a transformers model directory."""
    from fusesurgery.hf import export_transformers, register_transformers

    pytest.importorskip("transformers")
    register_transformers()
    out = tmp_path_factory.mktemp("gated-export") / "hf"
    export_transformers(gated_example, out)
    return out


@pytest.fixture(scope="session")
def zero_export(fused_example, tmp_path_factory) -> Path:
    """``fused_example`` (zero gates) exported as a transformers model directory."""
    from fusesurgery.hf import export_transformers, register_transformers

    pytest.importorskip("transformers")
    register_transformers()
    out = tmp_path_factory.mktemp("zero-export") / "hf"
    export_transformers(fused_example, out)
    return out
