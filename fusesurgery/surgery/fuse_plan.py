"""Plan a fusion from metadata alone: which tensors come from which source, which are new,
their names, shapes, dtypes and how each new one starts.

Nothing here touches tensor data; :mod:`fusesurgery.surgery.new_params` creates the new
tensors and :func:`fusesurgery.write.fuse_checkpoints` streams everything to disk.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

from fusesurgery._arguments import argument_error, brief, check_int, is_int
from fusesurgery.config import (
    DecoderConfig,
    FeatureTokens,
    FusionConfig,
    VisionEncoderConfig,
)
from fusesurgery.convert.detect import DetectedModel
from fusesurgery.convert.keymaps import (
    FUSED_DECODER_PREFIX,
    FUSED_PROJECTION_PREFIX,
    FUSED_VISION_PREFIX,
)
from fusesurgery.convert.plan import ConversionPlan
from fusesurgery.errors import ConfigError
from fusesurgery.families import DECODER_FAMILIES, VISION_FAMILIES
from fusesurgery.io import TensorInfo
from fusesurgery.surgery.fused_config import (
    EMBEDDING_INITS,
    GATE_SUFFIXES,
    PROJECTIONS,
    FusedConfig,
    NewToken,
)

# torch and the modules are imported where modules are built: fuse starts copying before
# torch has loaded
if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_NEW_TOKENS: tuple[str, ...] = ("<|image|>",)
DEFAULT_EVERY = 4
# The hidden layer of each encoder family that feeds the fusion, in transformers'
# ``hidden_states[k]`` numbering (None: the final hidden states), from its family file. CLIP:
# the penultimate layer, as LLaVA; SigLIP: its final, post-normed hidden states, as PaliGemma;
# DINOv2: its final, post-normed hidden states, as Cambrian and Molmo take them.
ENCODER_LAYER_DEFAULTS: dict[str, int | None] = {
    name: family.encoder_layer_default for name, family in VISION_FAMILIES.items()}
# The output tokens of each encoder family that feed the fusion (``feature_tokens``): every
# token, except DINOv2's and DINOv3's registers, which the papers that fuse DINOv2 leave out.
ENCODER_TOKENS_DEFAULTS: dict[str, str] = {
    name: family.encoder_tokens_default for name, family in VISION_FAMILIES.items()}
ENCODER_TOKENS: tuple[str, ...] = get_args(FeatureTokens)
assert all(tokens in ENCODER_TOKENS for tokens in ENCODER_TOKENS_DEFAULTS.values()), (
    "a family's default encoder tokens are not a FeatureTokens value")
FUSION_EMBEDDING_KEY = FUSED_DECODER_PREFIX + "tok_embeddings.fusion_embedding.weight"
EMBEDDING_KEY = "tok_embeddings.weight"


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


@dataclass(frozen=True)
class FuseOptions:
    """How to fuse (the library's spelling of ``fusesurgery fuse``'s options).

    Args:
        fusion_layers: decoder layers that get a fusion layer; None uses ``every``.
        every: a fusion layer in every ``every``-th layer (4: layers 3, 7, 11, ...).
        fusion_first: run the fusion layer before the original layer (Flamingo, Llama 3.2).
        new_tokens: tokens added to the embedding (ids ``vocab_size + i``).
        embedding_init: how new rows start: ``mean`` of the table (every row the mean),
            ``zeros``, or ``normal`` (each dimension drawn from the table's mean and std).
        encoder_layer: the encoder hidden layer that feeds the fusion (``hidden_states[k]``
            numbering; negative counts from the end; None: final hidden states);
            ``DEFAULT`` takes :data:`ENCODER_LAYER_DEFAULTS` for the family.
        encoder_tokens: which encoder output tokens feed the fusion: ``all``,
            ``cls_and_patches`` (registers left out) or ``patches``; ``DEFAULT`` takes
            :data:`ENCODER_TOKENS_DEFAULTS` for the family.
        projection: ``linear`` or ``mlp`` (two layers, GELU) from encoder to decoder width.
        dtype: cast every tensor to this dtype; None keeps each source's dtype (new decoder-side
            tensors and the projection take the decoder's).
        seed: seed of the new parameters (each tensor is drawn from its own generator, seeded
            from this and its name, so the values do not depend on order).
    """

    fusion_layers: Sequence[int] | None = None
    every: int = DEFAULT_EVERY
    fusion_first: bool = True
    new_tokens: Sequence[str] = DEFAULT_NEW_TOKENS
    embedding_init: str = "mean"
    encoder_layer: int | None | _Default = DEFAULT
    encoder_tokens: str | _Default = DEFAULT
    projection: str = "mlp"
    dtype: torch.dtype | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse a value of the wrong type at once, naming the argument (``fuse``'s names),
        instead of a TypeError from deep inside planning.

        Raises:
            ConfigError: naming the argument and the value.
        """
        layers = self.fusion_layers
        if layers is not None and (isinstance(layers, str | bytes) or not isinstance(
                layers, Sequence | range) or not all(is_int(i) for i in layers)):
            raise argument_error("layers", layers, "a list of decoder layer indices (ints)")
        if not is_int(self.every):
            raise argument_error("every", self.every, "an integer")
        if not isinstance(self.fusion_first, bool):
            raise argument_error("fusion_first", self.fusion_first, "True or False")
        if isinstance(self.new_tokens, str | bytes) or not isinstance(self.new_tokens, Sequence):
            raise argument_error("new_tokens", self.new_tokens, "a list of strings")
        for name in ("embedding_init", "projection"):
            if not isinstance(getattr(self, name), str):
                raise argument_error(name, getattr(self, name), "a string")
        layer = self.encoder_layer
        if layer is not DEFAULT and layer is not None and not is_int(layer):
            raise argument_error("encoder_layer", layer, "a hidden-layer index (an int), "
                                  "None (the final hidden states) or the family default")
        tokens = self.encoder_tokens
        if tokens is not DEFAULT and tokens not in ENCODER_TOKENS:
            raise argument_error("encoder_tokens", tokens, "one of " + ", ".join(ENCODER_TOKENS)
                                 + " or the family default")
        # a torch dtype implies torch is loaded; looking it up keeps the plan torch-free
        loaded_torch = sys.modules.get("torch")
        if self.dtype is not None and (loaded_torch is None
                                       or not isinstance(self.dtype, loaded_torch.dtype)):
            raise argument_error("dtype", self.dtype, "a torch dtype or None")
        check_int("seed", self.seed, 0, FUSE_SEED_LIMIT,
                  "it is mixed with each new tensor's name into one 64-bit torch seed")


# fuse's seed takes the upper 32 bits of each new tensor's torch seed (see new_params).
FUSE_SEED_LIMIT = 2**32


@dataclass(frozen=True)
class NewTensor:
    """A tensor the fusion creates.

    Args:
        name: its key in the fused checkpoint.
        shape: its shape.
        dtype: its dtype.
        init: ``("uniform", bound)``, ``("zeros",)``, ``("ones",)`` or ``("embedding", how)``
            (rows from the decoder's table statistics).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: tuple

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.name, self.shape, self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class FusePlan:
    """Everything ``fuse`` will write, from metadata.

    Args:
        config: the fusion config to write (sources filled in by the writer).
        decoder_plan: the decoder's tensors into the native layout (keys without the
            ``decoder.`` prefix).
        encoder_plan: the vision tower's tensors into the native layout (keys without the
            ``encoder.vision.`` prefix).
        new_tensors: the fusion layers, the new embedding rows and the projection head.
        embedding_source_key: the decoder source key of the embedding table (read for the
            ``mean``/``normal`` init).
    """

    config: FusedConfig
    decoder_plan: ConversionPlan
    encoder_plan: ConversionPlan
    new_tensors: tuple[NewTensor, ...]
    embedding_source_key: str

    @property
    def copied_bytes(self) -> int:
        return self.decoder_plan.total_bytes + self.encoder_plan.total_bytes

    @property
    def new_bytes(self) -> int:
        return sum(t.nbytes for t in self.new_tensors)

    @property
    def total_bytes(self) -> int:
        return self.copied_bytes + self.new_bytes

    @property
    def largest_new_tensor(self) -> int:
        return max((t.nbytes for t in self.new_tensors), default=0)


def _init_rule(module: nn.Module, param: str) -> tuple:
    from torch import nn  # noqa: PLC0415 - see the imports

    from fusesurgery.modules import RMSNorm, TanhGate  # noqa: PLC0415

    if isinstance(module, nn.Linear):
        # torch's own nn.Linear init: kaiming_uniform(a=sqrt(5)) -> U(+-1/sqrt(fan_in)), and
        # the same bound for the bias
        return ("uniform", 1.0 / math.sqrt(module.in_features))
    if isinstance(module, TanhGate):
        return ("zeros",)  # the identity at initialisation
    if isinstance(module, RMSNorm):  # the (1 + w) kind starts at w = 0: the same norm
        return ("zeros",) if module.unit_offset else ("ones",)
    if isinstance(module, nn.LayerNorm):
        return ("ones",) if param == "weight" else ("zeros",)
    raise TypeError(f"no init rule for {type(module).__name__}.{param}")  # a programming error


def new_module_tensors(module: nn.Module, prefix: str, dtype: torch.dtype) -> list[NewTensor]:
    """The parameters of a freshly built (meta-device) module as planned new tensors."""
    out = []
    modules = dict(module.named_modules())
    for name, param in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        out.append(NewTensor(prefix + name, tuple(param.shape), dtype,
                             _init_rule(modules[owner], leaf)))
    return out


def resolve_fusion_layers(options: FuseOptions, num_layers: int) -> tuple[int, ...]:
    """The decoder layers that get a fusion layer.

    Raises:
        ConfigError: an index out of range, ``every`` larger than the layer count or not
            positive, or no layer at all.
    """
    if options.fusion_layers is not None:
        layers = tuple(options.fusion_layers)
        if not layers:
            raise ConfigError("no fusion layers given", flag="--layers")
        bad = [i for i in layers if not (0 <= i < num_layers)]
        if bad:
            raise ConfigError(f"fusion layer {bad[0]} is out of range for a {num_layers}-layer "
                              f"decoder (valid: 0..{num_layers - 1})")
        if len(set(layers)) != len(layers):
            seen: set[int] = set()
            repeated = next(i for i in layers if i in seen or seen.add(i))
            raise ConfigError(f"fusion layers repeat an index ({repeated}): {brief(list(layers))}")
        return tuple(sorted(layers))
    if options.every <= 0:
        raise ConfigError(f"--every must be positive, got {options.every}")
    if options.every > num_layers:
        raise ConfigError(f"--every {options.every} is larger than the decoder's {num_layers} "
                          "layers: no layer would get a fusion layer")
    return tuple(range(options.every - 1, num_layers, options.every))


def _check_tokens(tokens: Sequence[str]) -> tuple[str, ...]:
    tokens = tuple(tokens)
    for token in tokens:
        if not isinstance(token, str) or not token or token != token.strip():
            raise ConfigError(f"new token {token!r} must be a non-empty string without "
                              "surrounding whitespace")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"new tokens repeat: {list(tokens)}")
    return tokens


def check_fuse_inputs(decoder_kind: str, encoder_kind: str) -> None:
    """The DECODER must hold a decoder and the ENCODER a vision tower.

    Raises:
        ConfigError: swapped inputs, a fused input, or another kind of checkpoint.
    """
    if decoder_kind == "vision" and encoder_kind == "decoder":
        raise ConfigError("the encoder and the decoder are swapped: give the vision tower first "
                          "(fusesurgery fuse ENCODER DECODER)")
    for kind, want, role in ((decoder_kind, "decoder", "DECODER"),
                             (encoder_kind, "vision", "ENCODER")):
        if kind == "fused":
            raise ConfigError(f"{role} is already a fused checkpoint; fuse takes an unfused "
                              "vision tower and decoder (see fusesurgery unfuse)")
        if kind != want:
            families = VISION_FAMILIES if want == "vision" else DECODER_FAMILIES
            names = ", ".join(family.display_name for family in families.values())
            what = f"a vision tower ({names})" if want == "vision" else f"a decoder ({names})"
            raise ConfigError(f"{role} holds a {kind} checkpoint, not {what}")


def _main_dtype(plan: ConversionPlan, key: str) -> torch.dtype:
    return plan.entry(key).dtype


def plan_fuse(
    decoder: DetectedModel,
    decoder_plan: ConversionPlan,
    encoder: DetectedModel,
    encoder_plan: ConversionPlan,
    options: FuseOptions = FuseOptions(),
    *,
    version: str = "",
) -> FusePlan:
    """Plan fusing ``encoder`` into ``decoder``, from metadata.

    Args:
        decoder: the detected decoder.
        decoder_plan: its conversion to the native layout (see ``plan_conversion``).
        encoder: the detected vision tower, its ``output_layer`` not yet chosen.
        encoder_plan: its conversion to the native layout.
        options: where and how to fuse.
        version: the fusesurgery version to record.

    Returns:
        The plan.

    Raises:
        ConfigError: swapped or unrecognised inputs, a fusion layer out of range, an unknown
            projection or embedding init, bad new tokens, an encoder layer out of range, or
            class-token features asked of a tower without one.
    """
    check_fuse_inputs(decoder.kind, encoder.kind)
    if options.projection not in PROJECTIONS:
        raise ConfigError(f"unknown projection {options.projection!r}; valid: "
                          f"{', '.join(PROJECTIONS)}")
    if options.embedding_init not in EMBEDDING_INITS:
        raise ConfigError(f"unknown embedding init {options.embedding_init!r}; valid: "
                          f"{', '.join(EMBEDDING_INITS)}")
    decoder_cfg: DecoderConfig = decoder.config
    encoder_cfg: VisionEncoderConfig = encoder.config
    layer = options.encoder_layer
    if layer is DEFAULT:
        layer = ENCODER_LAYER_DEFAULTS[encoder_cfg.family]
    if layer is not None and not (-encoder_cfg.num_layers - 1 <= layer <= encoder_cfg.num_layers):
        raise ConfigError(f"--encoder-layer {layer} is outside [-{encoder_cfg.num_layers + 1}, "
                          f"{encoder_cfg.num_layers}] for a {encoder_cfg.num_layers}-layer "
                          "encoder")
    feature_tokens = options.encoder_tokens
    if feature_tokens is DEFAULT:
        feature_tokens = ENCODER_TOKENS_DEFAULTS[encoder_cfg.family]
    elif feature_tokens == "cls_and_patches" and not encoder_cfg.class_token:
        # it would feed exactly what "all" feeds, not the class token the user asked for
        raise ConfigError(f"--encoder-tokens cls_and_patches: a {encoder_cfg.family} tower has "
                          "no class token; its output tokens are all patches (patches or "
                          "all)")
    encoder_cfg = encoder_cfg.replace(output_layer=layer, feature_tokens=feature_tokens)
    tokens = _check_tokens(options.new_tokens)
    fusion = FusionConfig(
        fusion_layers=resolve_fusion_layers(options, decoder_cfg.num_layers),
        encoder_dim=decoder_cfg.embed_dim,
        fusion_vocab_size=len(tokens),
        fusion_first=options.fusion_first,
        # the decoder's own epsilon, as Meta's Llama 3.2 Vision and transformers' Mllama use
        # for every norm (torchtune's builder alone uses 1e-6): a fused model exports to
        # Mllama exactly
        ca_norm_eps=decoder_cfg.norm_eps,
        qk_norm_eps=decoder_cfg.norm_eps,
        # and its norms' kind: Gemma's (1 + w) norms, whose weights train around zero
        norm_unit_offset=decoder_cfg.norm_unit_offset,
    )

    decoder_dtype = _main_dtype(decoder_plan, EMBEDDING_KEY)
    encoder_dtype = _main_dtype(encoder_plan, "conv.weight")
    import torch  # noqa: PLC0415 - see the imports

    from fusesurgery.modules import build_fusion_layer, build_projection  # noqa: PLC0415

    new: list[NewTensor] = []
    with torch.device("meta"):
        for index in fusion.fusion_layers:
            module = build_fusion_layer(decoder_cfg, fusion)
            new += new_module_tensors(
                module, f"{FUSED_DECODER_PREFIX}layers.{index}.fusion_layer.", decoder_dtype)
        if tokens:
            new.append(NewTensor(FUSION_EMBEDDING_KEY, (len(tokens), decoder_cfg.embed_dim),
                                 decoder_dtype, ("embedding", options.embedding_init)))
        head = build_projection(options.projection, encoder_cfg.embed_dim, decoder_cfg.embed_dim)
        new += new_module_tensors(head, FUSED_PROJECTION_PREFIX, decoder_dtype)

    config = FusedConfig(
        decoder=decoder_cfg,
        encoder=encoder_cfg,
        fusion=fusion,
        projection=options.projection,
        new_tokens=tuple(NewToken(t, decoder_cfg.vocab_size + i) for i, t in enumerate(tokens)),
        embedding_init=options.embedding_init,
        dtypes={"decoder": _dtype_name(decoder_dtype), "encoder": _dtype_name(encoder_dtype),
                "fusion": _dtype_name(decoder_dtype)},
        seed=options.seed,
        gates={t.name: 0.0 for t in new if t.name.endswith(GATE_SUFFIXES)},
        version=version,
    )
    return FusePlan(
        config=config,
        decoder_plan=decoder_plan,
        encoder_plan=encoder_plan,
        new_tensors=tuple(new),
        embedding_source_key=decoder_plan.entry(EMBEDDING_KEY).source_key,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fused_key_of(part: str, native_key: str) -> str:
    """The fused checkpoint key of a source tensor's native key."""
    return (FUSED_DECODER_PREFIX if part == "decoder" else FUSED_VISION_PREFIX) + native_key


def native_key_of(fused_key: str) -> tuple[str, str] | None:
    """``(part, native key)`` of an original tensor's fused key; None for a new tensor's."""
    if fused_key.startswith(FUSED_PROJECTION_PREFIX):
        return None
    if fused_key.startswith(FUSED_VISION_PREFIX):
        return "encoder", fused_key.removeprefix(FUSED_VISION_PREFIX)
    if fused_key.startswith(FUSED_DECODER_PREFIX):
        native = fused_key.removeprefix(FUSED_DECODER_PREFIX)
        if ".fusion_layer." in native or native.startswith("tok_embeddings.fusion_embedding."):
            return None
        return "decoder", native
    return None


def new_tensor_names(shapes: Mapping[str, object]) -> list[str]:
    """The keys of a fused checkpoint that the fusion created."""
    return [key for key in shapes if native_key_of(key) is None]


__all__ = [
    "DEFAULT",
    "DEFAULT_EVERY",
    "DEFAULT_NEW_TOKENS",
    "ENCODER_LAYER_DEFAULTS",
    "ENCODER_TOKENS",
    "ENCODER_TOKENS_DEFAULTS",
    "FUSION_EMBEDDING_KEY",
    "FuseOptions",
    "FusePlan",
    "NewTensor",
    "check_fuse_inputs",
    "fused_key_of",
    "native_key_of",
    "new_module_tensors",
    "new_tensor_names",
    "plan_fuse",
    "resolve_fusion_layers",
]
