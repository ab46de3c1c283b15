"""Option aliases shared by several commands (typer ``Annotated`` types)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from fusesurgery.errors import ConfigError
from fusesurgery.io.tensor_info import FLOAT_DTYPE_ALIASES, dtype_from_name

if TYPE_CHECKING:
    import torch

OVERRIDES_PANEL = "Config overrides (for checkpoints without a config, or to correct one)"

# str, not Path: a Path would turn hf://org/name into hf:/org/name
CheckpointPath = Annotated[
    str,
    typer.Argument(
        help="A checkpoint: .safetensors, model.safetensors.index.json, .pt/.pth/.bin, a "
        "Hugging Face / Meta / fusesurgery directory, or a Hub repo (org/name[@revision], "
        "hf://org/name).",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON document for scripts.")]

NumHeads = Annotated[int | None, typer.Option(
    "--num-heads", help="Decoder attention heads.", rich_help_panel=OVERRIDES_PANEL)]
NumKvHeads = Annotated[int | None, typer.Option(
    "--num-kv-heads", help="Decoder key/value heads (GQA).", rich_help_panel=OVERRIDES_PANEL)]
HeadDim = Annotated[int | None, typer.Option(
    "--head-dim", help="Decoder per-head width.", rich_help_panel=OVERRIDES_PANEL)]
RopeBase = Annotated[float | None, typer.Option(
    "--rope-base", help="Decoder RoPE theta.", rich_help_panel=OVERRIDES_PANEL)]
NormEps = Annotated[float | None, typer.Option(
    "--norm-eps", help="Decoder RMSNorm epsilon.", rich_help_panel=OVERRIDES_PANEL)]
EncoderNumHeads = Annotated[int | None, typer.Option(
    "--encoder-num-heads", help="Vision encoder attention heads.",
    rich_help_panel=OVERRIDES_PANEL)]


def collect_overrides(**values: Any) -> dict[str, Any]:
    """Config overrides from option values, leaving out options that were not given.

    ``encoder_*`` names map to vision-encoder fields without the prefix; the caller applies
    each set to the matching model kind.
    """
    return {name: value for name, value in values.items() if value is not None}


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(decoder overrides, vision-encoder overrides)`` from ``collect_overrides``' output."""
    decoder = {k: v for k, v in overrides.items() if not k.startswith("encoder_")}
    vision = {k.removeprefix("encoder_"): v for k, v in overrides.items()
              if k.startswith("encoder_")}
    return decoder, vision


DtypeOption = Annotated[str | None, typer.Option(
    "--dtype", help=f"Cast floating-point tensors: {', '.join(FLOAT_DTYPE_ALIASES)}.")]


def parse_dtype_option(name: str | None, flag: str = "--dtype") -> torch.dtype | None:
    """A ``--dtype`` value as a torch dtype (None when not given).

    Raises:
        ConfigError: an unknown name.
    """
    if name is None:
        return None
    try:
        return dtype_from_name(name)
    except ValueError as error:
        raise ConfigError(f"{flag}: {error}") from None
