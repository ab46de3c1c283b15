"""Which devices fusesurgery runs models on, checked before any work."""

from __future__ import annotations

import torch

from fusesurgery.errors import ConfigError


def check_device(device: str | torch.device, name: str = "--device") -> None:
    """Refuse a device a model cannot be put on here, before any work.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (a str or a ``torch.device``).
        name: how the caller's user spells the argument, for the message.

    Raises:
        ConfigError: not a device (``tpu``, ``cuda:x``, a number), no CUDA device, or a
            ``cuda:N`` past the machine's count.
    """
    if not isinstance(device, str | torch.device):
        raise ConfigError(f"{name} must be a device name such as 'cpu' or 'cuda:0', not "
                          f"{device!r} ({type(device).__name__})")
    # the device forms the forward checks run on; anything else (tpu, cuda:x) is bad input
    kind, _, index = str(device).partition(":")
    forms = ["cpu", "cuda", "cuda:N", *(["mps"] if torch.backends.mps.is_built() else [])]
    if (kind not in ("cpu", "cuda", "mps") or (kind == "mps" and "mps" not in forms)
            or (index and (kind != "cuda" or not index.isdigit()))):
        raise ConfigError(f"{name}: unknown device {str(device)!r}; valid: "
                          f"{', '.join(forms)}")
    if kind == "cuda" and not torch.cuda.is_available():
        built = "with" if torch.version.cuda else "without"
        raise ConfigError(f"{name} {device}: no CUDA device is available on this machine "
                          f"(torch {torch.__version__}, built {built} CUDA)")
    if index and int(index) >= torch.cuda.device_count():
        from fusesurgery._plural import plural  # noqa: PLC0415 - this message alone

        raise ConfigError(f"{name} {device}: this machine has "
                          f"{plural(torch.cuda.device_count(), 'CUDA device')}, from cuda:0")


__all__ = ["check_device"]
