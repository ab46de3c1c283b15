"""Option aliases shared by several commands (typer ``Annotated`` types)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

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
DecoderFamilyName = Annotated[str | None, typer.Option(
    "--family", help="Decoder family (llama, smollm3, phi3, ...), for weights without a config "
    "that name none: native Llama, SmolLM3 and Phi-3 keys look alike.",
    rich_help_panel=OVERRIDES_PANEL, show_default=False)]
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


# The dtypes a --dtype cast may produce: those every forward check computes in (on CPU too).
# fp8 is read and inspected, but a plain cast to it (no scales) is not a usable checkpoint and
# torch has no fp8 matmul on CPU, so it is not offered.
CAST_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32", "float64")
# Every name of those dtypes, a dtype's names together: bf16, bfloat16, f16, float16, half, ...
CAST_DTYPE_NAMES: tuple[str, ...] = tuple(
    name for dtype in CAST_DTYPES for name, torch_name in FLOAT_DTYPE_ALIASES.items()
    if torch_name == dtype)


def _dtype_help() -> str:
    names: dict[str, list[str]] = {}
    for name in CAST_DTYPE_NAMES:
        names.setdefault(FLOAT_DTYPE_ALIASES[name], []).append(name)
    return "; ".join(", ".join(spellings) for spellings in names.values())


DtypeOption = Annotated[Literal[CAST_DTYPE_NAMES] | None, typer.Option(
    "--dtype", case_sensitive=False,
    help=f"Cast floating-point tensors to one dtype: {_dtype_help()}.")]


def parse_dtype_option(name: str | None, flag: str = "--dtype") -> torch.dtype | None:
    """A ``--dtype`` value as a torch dtype (None when not given): one of
    :data:`CAST_DTYPE_NAMES`.

    Raises:
        ConfigError: an unknown name, or a dtype that is no cast target (fp8, integers).
    """
    if name is None:
        return None
    try:
        dtype = dtype_from_name(name)
    except ValueError:
        dtype = None
    if dtype is None or str(dtype).removeprefix("torch.") not in CAST_DTYPES:
        raise ConfigError(f"{flag}: unknown dtype {name!r}; valid: "
                          f"{', '.join(CAST_DTYPE_NAMES)}")
    return dtype
