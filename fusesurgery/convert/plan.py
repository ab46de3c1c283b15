"""Conversion plans: pure data computed from checkpoint metadata, applied one tensor at a time.

A plan says, for every tensor the converted checkpoint will hold, which source tensor it comes
from, which transform turns one into the other, and the resulting shape and dtype; and which
source keys are dropped and why. Planning reads names, shapes and dtypes only, so a 405B
checkpoint plans in milliseconds; :func:`apply_plan_entry` is the only place values are touched.

The only values a decoder plan changes are q/k rows (and Qwen2's q/k biases, a q/k norm's
scale) whose RoPE pairing differs between the source and target layouts
(``LAYOUT_ROPE_STYLES``): Llama and Mistral are permuted between Hugging Face and native,
Qwen2 and Qwen3 are not (their native layout keeps Hugging Face's rotate-half order, as
torchtune's does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fusesurgery.config import DecoderConfig, RopeStyle, VisionEncoderConfig
from fusesurgery.convert.keymaps import (
    FUSED_DECODER_PREFIX,
    LAYER,
    NATIVE_DECODER_KEYS,
    NATIVE_VISION_KEYS,
    KeyMapping,
    from_native_key,
    keys_to_native,
    split_layer_index,
    stacked_key,
)
from fusesurgery.convert.mllama import FUSED_EMBEDDING as MLLAMA_EMBEDDING
from fusesurgery.convert.mllama import FUSED_FUSION_EMBEDDING as MLLAMA_FUSION_EMBEDDING
from fusesurgery.convert.mllama import split_embedding_shapes
from fusesurgery.convert.transforms import (
    IDENTITY,
    PERMUTE_QK_FROM_NATIVE,
    PERMUTE_QK_TO_NATIVE,
    STACK_ROWS,
    TAKE_ROWS,
    Transform,
    apply_transform,
    stack_rows,
)
from fusesurgery.errors import ConfigError, KeyMapError, ShapeError
from fusesurgery.families import decoder_family
from fusesurgery.io.tensor_info import SAFETENSORS_DTYPE_FACTS, TensorInfo

if TYPE_CHECKING:
    import torch

Shape = tuple[int, ...]
ModelConfig = DecoderConfig | VisionEncoderConfig

TIED_OUTPUT_REASON = "tie_word_embeddings: the output projection is the embedding table"


# --------------------------------------------------------------------------------------------
# What a config expects.


def _decoder_shapes(config: DecoderConfig) -> dict[str, Shape]:
    d, q_rows = config.embed_dim, config.num_heads * config.head_dim
    kv_rows, ffn = config.num_kv_heads * config.head_dim, config.intermediate_dim
    per_layer: dict[str, Shape] = {
        "layers.{i}.sa_norm.scale": (d,),
        "layers.{i}.attn.q_proj.weight": (q_rows, d),
        "layers.{i}.attn.k_proj.weight": (kv_rows, d),
        "layers.{i}.attn.v_proj.weight": (kv_rows, d),
        "layers.{i}.attn.output_proj.weight": (d, q_rows),
        "layers.{i}.mlp_norm.scale": (d,),
        "layers.{i}.mlp.w1.weight": (ffn, d),
        "layers.{i}.mlp.w2.weight": (d, ffn),
        "layers.{i}.mlp.w3.weight": (ffn, d),
    }
    if config.attn_bias:
        per_layer["layers.{i}.attn.q_proj.bias"] = (q_rows,)
        per_layer["layers.{i}.attn.k_proj.bias"] = (kv_rows,)
        per_layer["layers.{i}.attn.v_proj.bias"] = (kv_rows,)
    if config.qk_norm:
        per_layer["layers.{i}.attn.q_norm.scale"] = (config.head_dim,)
        per_layer["layers.{i}.attn.k_norm.scale"] = (config.head_dim,)
    if config.post_norms:
        per_layer["layers.{i}.sa_scale.scale"] = (d,)
        per_layer["layers.{i}.mlp_scale.scale"] = (d,)
    shapes: dict[str, Shape] = {"tok_embeddings.weight": (config.vocab_size, d)}
    for layer in range(config.num_layers):
        for template, shape in per_layer.items():
            shapes[template.replace(LAYER, str(layer))] = shape
    shapes[config.final_norm_key] = (d,)
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (config.vocab_size, d)
    return shapes


def _vision_shapes(config: VisionEncoderConfig) -> dict[str, Shape]:
    d, ffn, p = config.embed_dim, config.intermediate_dim, config.patch_size
    shapes: dict[str, Shape] = {"conv.weight": (d, config.num_channels * p * p) if config.naflex
                                else (d, config.num_channels, p, p)}
    if config.patch_bias:
        shapes["conv.bias"] = (d,)
    lead = (1,) if config.batch_dim_tables else ()
    if config.class_token:
        shapes["cls_token_embedding.weight"] = (*lead, *lead, d)
    if config.mask_token:  # DINOv3 stores it as [1, 1, d_e]
        shapes["mask_token.weight"] = (1, 1, d) if config.family == "dinov3" else (1, d)
    if config.num_register_tokens:
        shapes["register_tokens.weight"] = (1, config.num_register_tokens, d)
    if config.patch_rope_base is None:  # a 2-D RoPE has no table
        shapes["token_pos_embedding.positional_embedding"] = (*lead, config.num_positions, d)
    if config.pre_norm:
        shapes["ln_pre.weight"] = shapes["ln_pre.bias"] = (d,)
    per_layer: dict[str, Shape] = {}
    for norm in ("sa_norm", "mlp_norm"):
        per_layer[f"layers.{{i}}.{norm}.weight"] = per_layer[f"layers.{{i}}.{norm}.bias"] = (d,)
    for proj in ("q_proj", "k_proj", "v_proj", "output_proj"):
        per_layer[f"layers.{{i}}.attn.{proj}.weight"] = (d, d)
        if proj != "k_proj" or config.key_bias:
            per_layer[f"layers.{{i}}.attn.{proj}.bias"] = (d,)
    per_layer["layers.{i}.mlp.w1.weight"], per_layer["layers.{i}.mlp.w1.bias"] = (ffn, d), (ffn,)
    per_layer["layers.{i}.mlp.w2.weight"], per_layer["layers.{i}.mlp.w2.bias"] = (d, ffn), (d,)
    if config.layer_scale:
        per_layer["layers.{i}.sa_scale.gamma"] = per_layer["layers.{i}.mlp_scale.gamma"] = (d,)
    for layer in range(config.num_layers):
        for template, shape in per_layer.items():
            shapes[template.replace(LAYER, str(layer))] = shape
    shapes["ln_post.weight"] = shapes["ln_post.bias"] = (d,)
    return shapes


def expected_native_shapes(config: ModelConfig) -> dict[str, Shape]:
    """Every native key a model with ``config`` holds, with its shape.

    A decoder's list is the plain decoder's (no fusion keys); a tied decoder has no
    ``output.weight``.
    """
    if isinstance(config, DecoderConfig):
        return _decoder_shapes(config)
    if isinstance(config, VisionEncoderConfig):
        return _vision_shapes(config)
    raise TypeError(f"expected a DecoderConfig or VisionEncoderConfig, got {type(config)}")


def layout_tensor_infos(
    config: ModelConfig,
    layout: str = "native",
    *,
    kind: str | None = None,
    dtype: torch.dtype | str = "BF16",
    prefix: str = "",
) -> dict[str, TensorInfo]:
    """Metadata of every tensor a checkpoint of ``config`` holds, spelled in ``layout``.

    The keys and shapes are :func:`expected_native_shapes` renamed by the key maps, so a
    405B-shaped checkpoint can be described (and planned, diffed or written as sparse test
    data) without a byte of tensor data.

    Args:
        config: the model's config.
        layout: ``"native"``, ``"hf"`` or ``"meta"``.
        kind: ``"decoder"`` or ``"vision"`` (taken from the config's type when None), or
            ``"fused"`` for a decoder config: its keys as a fused checkpoint stores them,
            under ``decoder.`` (the fusion layers and encoder are not included).
        dtype: every tensor's dtype: a torch dtype or a safetensors name (``"BF16"``).
        prefix: put before every key (after the layout spelling).

    Returns:
        Key -> TensorInfo, in the order :func:`expected_native_shapes` lists the keys.

    Raises:
        ConfigError: ``kind`` does not fit the config's type.
        KeyMapError: a key has no name in ``layout`` (e.g. Qwen2's q bias in Meta), or the
            layout does not exist for the kind.
    """
    kind = _kind_of(config, kind)
    native_prefix = FUSED_DECODER_PREFIX if kind == "fused" else ""
    infos: dict[str, TensorInfo] = {}
    for native_key, shape in expected_native_shapes(config).items():
        name = prefix + from_native_key(native_prefix + native_key, layout, kind,
                                        config.family)
        if name in infos:  # a part of a tensor the layout stacks (Phi-3's qkv_proj)
            stacked = infos[name].shape
            shape = (stacked[0] + shape[0], *stacked[1:])
        infos[name] = TensorInfo(name, shape, dtype)
    return infos


def dropped_by_reason(dropped: Iterable[tuple[str, str]] | Mapping[str, str]
                      ) -> list[tuple[str, str]]:
    """Dropped keys grouped by why, for one message line a reason rather than one a tensor.

    Args:
        dropped: ``(key, reason)`` pairs (``ConversionPlan.dropped``) or ``{key: reason}``
            (a fused source record's).

    Returns:
        ``[("first.key (+N more)", reason), ...]``, reasons in first-seen order.
    """
    pairs = dropped.items() if isinstance(dropped, Mapping) else dropped
    by_reason: dict[str, list[str]] = {}
    for key, reason in pairs:
        by_reason.setdefault(reason, []).append(key)
    return [(keys[0] + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""), reason)
            for reason, keys in by_reason.items()]


def list_keys(keys: list[str], limit: int = 3) -> str:
    """``a, b, c (+N more)``: the first ``limit`` keys of a list, for a one-line message."""
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_native_shapes(
    shapes: Mapping[str, Shape],
    config: ModelConfig,
    *,
    source_names: Mapping[str, str] | None = None,
    origin: str = "the config",
    prefix: str = "",
    layout: str = "native",
) -> None:
    """Check a checkpoint's native keys and shapes against what ``config`` expects.

    Args:
        shapes: native key -> shape, as the checkpoint holds them (extra keys outside
            ``prefix`` are ignored).
        config: the resolved config.
        source_names: native key -> key as stored, so messages name what the user can see.
        origin: where the config came from, for messages (``"config.json"``).
        prefix: the native keys sit under this prefix (``"decoder."`` in a fused checkpoint),
            which also means keys under it that no plain model has (fusion keys) are allowed.
        layout: the checkpoint's layout, to name missing keys as the user would see them.

    Raises:
        ConfigError: a key has the wrong shape (naming the key, expected and actual shapes),
            the config expects keys the checkpoint lacks, or the checkpoint has model keys the
            config does not account for (more layers, biases it does not declare).
    """
    names = source_names or {}
    expected = {prefix + key: shape for key, shape in expected_native_shapes(config).items()}
    mismatched = [
        f"{names.get(key, key)} has shape {list(shapes[key])}, expected {list(shape)}"
        for key, shape in expected.items()
        if key in shapes and tuple(shapes[key]) != shape
    ]
    if mismatched:
        more = f" (and {len(mismatched) - 1} more mismatches)" if len(mismatched) > 1 else ""
        raise ConfigError(f"checkpoint disagrees with {origin}: {mismatched[0]}{more}")
    kind = "decoder" if isinstance(config, DecoderConfig) else "vision"
    missing = [
        _spell(key, layout, kind, config.family) if not prefix else key
        for key in expected if key not in shapes
    ]
    if missing:
        raise ConfigError(
            f"checkpoint lacks {len(missing)} keys that {origin} implies: {list_keys(missing)}"
        )
    base_templates = set(
        NATIVE_DECODER_KEYS if isinstance(config, DecoderConfig) else NATIVE_VISION_KEYS
    )
    extra = [
        names.get(key, key)
        for key in shapes
        if key.startswith(prefix)
        and key not in expected
        and split_layer_index(key.removeprefix(prefix))[0] in base_templates
    ]
    if extra:
        raise ConfigError(
            f"checkpoint has {len(extra)} keys that {origin} does not account for: "
            f"{list_keys(extra)}"
        )


def _spell(native_key: str, layout: str, kind: str, family: str | None = None) -> str:
    try:
        return from_native_key(native_key, layout, kind, family)
    except KeyMapError:
        return native_key


# --------------------------------------------------------------------------------------------
# Plans.


@dataclass(frozen=True)
class PlanEntry:
    """One output tensor of a conversion.

    Args:
        target_key: the key it is written under.
        source_key: the key it is read from.
        transform: ``(name, *int_args)`` from ``convert.transforms.TRANSFORMS``, e.g.
            ``("permute_qk_to_native", n_heads, head_dim)``.
        source_shape: the source tensor's shape.
        source_dtype: the source tensor's dtype.
        shape: the output shape.
        dtype: the output dtype (a cast follows the transform when it differs).
        parts: for a tensor stacked from several (Phi-3's ``qkv_proj`` written from native
            q/k/v): one entry per part, in row order; the output is their outputs
            concatenated along dim 0 (``transform`` is ``("stack_rows",)``, ``source_key``
            the first part's). Empty for every other entry.
    """

    target_key: str
    source_key: str
    transform: Transform
    source_shape: Shape
    source_dtype: torch.dtype
    shape: Shape
    dtype: torch.dtype
    parts: tuple[PlanEntry, ...] = ()

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class ConversionPlan:
    """Everything a conversion will do, computed from metadata alone.

    Args:
        kind: ``"decoder"``, ``"vision"`` or ``"fused"``.
        source_layout: the layout read.
        target_layout: the layout written.
        entries: one per output tensor, in source order.
        dropped: ``(source key, reason)`` for each source key not carried over.
    """

    kind: str
    source_layout: str
    target_layout: str
    entries: tuple[PlanEntry, ...]
    dropped: tuple[tuple[str, str], ...]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def target_keys(self) -> tuple[str, ...]:
        return tuple(entry.target_key for entry in self.entries)

    @property
    def total_bytes(self) -> int:
        """Bytes of all output tensors (what a writer shards)."""
        return sum(entry.nbytes for entry in self.entries)

    def entry(self, target_key: str) -> PlanEntry:
        """The entry that produces ``target_key``.

        Raises:
            KeyMapError: no entry produces it.
        """
        for entry in self.entries:
            if entry.target_key == target_key:
                return entry
        raise KeyMapError(f"the plan writes no key {target_key!r}")

    def target_infos(self) -> dict[str, TensorInfo]:
        """Output key -> metadata of the tensor the plan will produce."""
        return {
            entry.target_key: TensorInfo(entry.target_key, entry.shape, entry.dtype)
            for entry in self.entries
        }


# A q/k norm's [h_d] scale multiplies one head's features, so it is ordered like one head's
# rows (Qwen3's stay as they are: its native layout rotates halves, as Hugging Face's does).
_QK_TEMPLATES = {
    "layers.{i}.attn.q_proj.weight": "q",
    "layers.{i}.attn.q_proj.bias": "q",
    "layers.{i}.attn.k_proj.weight": "k",
    "layers.{i}.attn.k_proj.bias": "k",
    "layers.{i}.attn.q_norm.scale": "head",
    "layers.{i}.attn.k_norm.scale": "head",
}
_QK_HEADS: dict[str, Callable[[DecoderConfig], int]] = {
    "q": lambda config: config.num_heads,
    "k": lambda config: config.num_kv_heads,
    "head": lambda config: 1,
}

# The RoPE pairing each layout's q/k rows are ordered for. Hugging Face is always rotate-half
# (transformers' convention) and Meta always interleaved (its reference code); the native
# layout follows the family (``DecoderConfig.rope_style``), as torchtune's converters do.
LAYOUT_ROPE_STYLES: dict[str, RopeStyle] = {"hf": "half", "meta": "interleaved"}

# (source pairing, target pairing) -> the q/k row reordering between them.
_ROPE_PERMUTATIONS: dict[tuple[str, str], str] = {
    ("half", "interleaved"): PERMUTE_QK_TO_NATIVE,
    ("interleaved", "half"): PERMUTE_QK_FROM_NATIVE,
}


def layout_rope_style(layout: str, config: DecoderConfig) -> RopeStyle:
    """The RoPE pairing that q/k rows of ``config``'s family follow in ``layout``."""
    return config.rope_style if layout == "native" else LAYOUT_ROPE_STYLES[layout]


def _rope_transform(
    native_key: str, source_layout: str, target_layout: str, config: DecoderConfig
) -> Transform:
    template, _ = split_layer_index(native_key)
    role = _QK_TEMPLATES.get(template)
    if role is None:
        return (IDENTITY,)
    styles = (layout_rope_style(source_layout, config), layout_rope_style(target_layout, config))
    name = _ROPE_PERMUTATIONS.get(styles)
    if name is None:  # same pairing on both sides: the rows stay as they are
        return (IDENTITY,)
    return (name, _QK_HEADS[role](config), config.head_dim)


def _kind_of(config: ModelConfig, kind: str | None) -> str:
    natural = "decoder" if isinstance(config, DecoderConfig) else "vision"
    if kind is None:
        return natural
    if kind == "fused" and natural == "decoder":
        return kind
    if kind != natural:
        raise ConfigError(f"a {type(config).__name__} cannot describe a {kind} checkpoint")
    return kind


# torch's names of the floating-point dtypes safetensors stores that a cast may give: fp8 is
# read, never cast to (a plain cast without scales is no usable checkpoint, and fp8 has no
# CPU forward for validate)
CAST_DTYPE_NAMES: tuple[str, ...] = tuple(
    torch_name for torch_name, size, is_float in SAFETENSORS_DTYPE_FACTS.values()
    if is_float and size >= 2
)


def check_cast_dtype(dtype: object) -> None:
    """``dtype`` must be None or a floating-point dtype that safetensors stores.

    Raises:
        ConfigError: anything else (an integer dtype, a string, a complex dtype).
    """
    if dtype is None:
        return
    import torch  # noqa: PLC0415 - a dtype to check means torch is in use

    if isinstance(dtype, torch.dtype) and str(dtype).removeprefix("torch.") in CAST_DTYPE_NAMES:
        return
    valid = ", ".join(CAST_DTYPE_NAMES)
    raise ConfigError(f"cannot cast weights to {dtype!r}; dtype must be one of: {valid}")


def legacy_native_renames(native_keys: Iterable[str], config: DecoderConfig,
                          prefix: str = "") -> dict[str, str]:
    """The keys of a native (or, under ``prefix``, fused native) key set spelled as an
    earlier fusesurgery wrote them for the family (``native_legacy_keys``: Gemma 2's final
    norm was ``norm.scale``) -> their current spelling. A key set that holds both spellings
    keeps both, for the shape check to refuse.

    Args:
        native_keys: the checkpoint's keys, already in the native layout.
        config: the decoder's config (its family).
        prefix: ``"decoder."`` for a fused checkpoint.
    """
    legacy = decoder_family(config.family).native_legacy_keys
    present = set(native_keys)
    return {prefix + old: prefix + new for old, new in legacy.items()
            if prefix + old in present and prefix + new not in present}


def _legacy_native_renamed(mapping: KeyMapping, config: DecoderConfig,
                           prefix: str) -> KeyMapping:
    """``mapping`` with :func:`legacy_native_renames` applied to its targets."""
    renames = legacy_native_renames(mapping.mapping.values(), config, prefix)
    if not renames:
        return mapping
    return dataclasses.replace(mapping, mapping={
        source: renames.get(target, target) for source, target in mapping.mapping.items()})


def plan_conversion(
    tensors: Mapping[str, TensorInfo],
    source_layout: str,
    config: ModelConfig,
    *,
    target_layout: str = "native",
    kind: str | None = None,
    dtype: torch.dtype | None = None,
) -> ConversionPlan:
    """Plan converting a checkpoint between layouts, from its metadata alone.

    Args:
        tensors: key -> metadata of every tensor in the source checkpoint.
        source_layout: ``"native"``, ``"hf"`` or ``"meta"``.
        config: the model's resolved config (see :func:`fusesurgery.convert.detect_model`).
        target_layout: the layout to write.
        kind: ``"fused"`` for a fused checkpoint (whose config is its decoder's); otherwise
            taken from the config's type.
        dtype: cast floating-point tensors to this dtype; None keeps each source dtype.

    Returns:
        The plan: one entry per output tensor in source order, plus the dropped keys.

    Raises:
        KeyMapError: unknown source keys, or keys with no name in the target layout.
        ConfigError: shapes disagree with the config, or ``dtype`` is not a floating-point
            dtype safetensors stores.
        ShapeError: a RoPE permutation does not fit (odd head_dim), or a weight that is not
            floating point.
    """
    check_cast_dtype(dtype)
    kind = _kind_of(config, kind)
    prefix = FUSED_DECODER_PREFIX if kind == "fused" else ""
    mapping = keys_to_native(tensors, source_layout, kind)
    if source_layout == "native" and isinstance(config, DecoderConfig):
        mapping = _legacy_native_renamed(mapping, config, prefix)
    dropped = dict(mapping.dropped)
    native_to_source = mapping.sources()

    output_key = prefix + "output.weight"
    if isinstance(config, DecoderConfig) and config.tie_word_embeddings:
        if output_key in native_to_source:
            dropped[native_to_source.pop(output_key)] = TIED_OUTPUT_REASON

    native_shapes = {native: tuple(tensors[source].shape)
                     for native, source in native_to_source.items()}
    row_ranges = stacked_row_ranges(mapping, tensors, config)
    for native, (start, stop) in row_ranges.items():
        native_shapes[native] = (stop - start, *native_shapes[native][1:])
    if source_layout == "mllama":  # one source table, two native ones
        split_embedding_shapes(native_shapes, native_to_source)
    check_native_shapes(
        native_shapes,
        config,
        source_names=native_to_source,
        prefix=prefix,
        layout=source_layout,
    )
    if isinstance(config, DecoderConfig) and config.head_dim % 2:
        raise ShapeError(f"head_dim {config.head_dim} is odd; RoPE rotates pairs of dims")

    entries: list[tuple[str | None, PlanEntry]] = []  # (native key, entry)
    for source_key in tensors:
        if source_key in dropped or source_key in mapping.parts:
            if source_key in mapping.parts:
                entries.extend(_stacked_entries(source_key, mapping.parts[source_key],
                                                tensors[source_key], row_ranges, kind,
                                                target_layout, config, dtype))
            continue
        if source_key not in mapping.mapping:
            continue
        native_key = mapping.mapping[source_key]
        info = tensors[source_key]
        if not info.is_floating_point:
            raise ShapeError(
                f"{source_key} holds {str(info.dtype).removeprefix('torch.')} values; every "
                "weight of a decoder or vision tower is floating point, so this checkpoint is "
                "damaged or quantised (dequantise it first)"
            )
        if source_layout == "mllama" and native_key == MLLAMA_EMBEDDING:
            vocab = native_shapes[MLLAMA_EMBEDDING][0]
            for key, start, stop in ((native_key, 0, vocab),
                                     (MLLAMA_FUSION_EMBEDDING, vocab, info.shape[0])):
                shape = (stop - start, *info.shape[1:])
                entries.append((key, PlanEntry(
                    target_key=key, source_key=source_key, transform=(TAKE_ROWS, start, stop),
                    source_shape=tuple(info.shape), source_dtype=info.dtype, shape=shape,
                    dtype=dtype if dtype is not None else info.dtype)))
            continue
        transform: Transform = (IDENTITY,)
        if kind == "decoder":
            transform = _rope_transform(native_key, source_layout, target_layout, config)
        elif source_layout == "mllama":  # its text model keeps transformers' q/k row order
            transform = _rope_transform(native_key.removeprefix(FUSED_DECODER_PREFIX), "hf",
                                        target_layout, config)
        out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        entries.append((native_key, PlanEntry(
            target_key=from_native_key(native_key, target_layout, kind, config.family),
            source_key=source_key,
            transform=transform,
            source_shape=tuple(info.shape),
            source_dtype=info.dtype,
            shape=tuple(info.shape),
            dtype=out_dtype,
        )))
    return ConversionPlan(
        kind=kind,
        source_layout=source_layout,
        target_layout=target_layout,
        entries=_stack_parts(entries, kind, target_layout, config),
        dropped=tuple(dropped.items()),
    )


def stacked_row_ranges(mapping: KeyMapping, tensors: Mapping[str, TensorInfo],
                       config: ModelConfig) -> dict[str, tuple[int, int]]:
    """For each native key a source tensor stacks with others (``mapping.parts``), the rows
    ``[start, stop)`` of that tensor it is: each part as many rows as ``config`` gives it.

    Raises:
        ConfigError: a stacked tensor's rows are not its parts' rows (the head counts or
            widths the config states do not fit it).
    """
    if not mapping.parts:
        return {}
    expected = expected_native_shapes(config)
    ranges: dict[str, tuple[int, int]] = {}
    for source, parts in mapping.parts.items():
        start, shapes = 0, []
        for part in parts:
            rows = expected.get(part, (0,))[0]
            ranges[part] = (start, start + rows)
            shapes.append(f"{part} {rows}")
            start += rows
        have = tensors[source].shape
        if not have or have[0] != start:
            raise ConfigError(
                f"checkpoint disagrees with the config: {source} has shape {list(have)}, "
                f"whose rows should stack {', '.join(shapes)} ({start} in all)")
    return ranges


def _stacked_entries(source_key: str, parts: tuple[str, ...], info: TensorInfo,
                     row_ranges: Mapping[str, tuple[int, int]], kind: str,
                     target_layout: str, config: ModelConfig,
                     dtype: torch.dtype | None) -> list[tuple[str | None, PlanEntry]]:
    """The entries of a source tensor that stacks native ones: the tensor whole where the
    target stacks the same parts under one key (a cast, or hf -> hf), else one row range a
    part."""
    out_dtype = dtype if dtype is not None else info.dtype
    family = config.family
    kept = stacked_key(parts[0], target_layout, kind, family)
    if kept is not None and kept.parts == parts:
        return [(None, PlanEntry(  # no native key: written as it is
            target_key=kept.key, source_key=source_key, transform=(IDENTITY,),
            source_shape=tuple(info.shape), source_dtype=info.dtype,
            shape=tuple(info.shape), dtype=out_dtype))]
    if target_layout == "meta" and not decoder_family(family).meta_layout:
        raise ConfigError(f"the Meta layout holds no {decoder_family(family).display_name} "
                          "decoder")
    out = []
    for part in parts:
        if isinstance(config, DecoderConfig) and _rope_transform(
                part, "hf", target_layout, config) != (IDENTITY,):
            raise ShapeError(f"{source_key}: its part {part} needs its q/k rows reordered as "
                             "well as cut out, which no family does yet")
        start, stop = row_ranges[part]
        out.append((part, PlanEntry(
            target_key=from_native_key(part, target_layout, kind, family),
            source_key=source_key, transform=(TAKE_ROWS, start, stop),
            source_shape=tuple(info.shape), source_dtype=info.dtype,
            shape=(stop - start, *info.shape[1:]), dtype=out_dtype)))
    return out


def _stack_parts(entries: list[tuple[str | None, PlanEntry]], kind: str, target_layout: str,
                 config: ModelConfig) -> tuple[PlanEntry, ...]:
    """The entries with those the target layout stacks into one tensor (native q/k/v ->
    Phi-3's ``qkv_proj``) merged into one entry, placed where its first part was.

    Raises:
        KeyMapError: a stacked tensor lacks some of its parts.
    """
    groups: dict[str, dict[str, PlanEntry]] = {}
    order: list[tuple[str, PlanEntry | None]] = []
    stacks: dict[str, tuple[str, ...]] = {}
    for native_key, entry in entries:
        stacked = None if native_key is None else stacked_key(native_key, target_layout, kind,
                                                              config.family)
        if stacked is None:
            order.append((entry.target_key, entry))
            continue
        if entry.target_key not in groups:
            groups[entry.target_key] = {}
            stacks[entry.target_key] = stacked.parts
            order.append((entry.target_key, None))
        groups[entry.target_key][native_key] = entry
    out = []
    for key, entry in order:
        if entry is not None:
            out.append(entry)
            continue
        parts = groups[key]
        missing = [part for part in stacks[key] if part not in parts]
        if missing:
            raise KeyMapError(f"{key} stacks {', '.join(stacks[key])}, but the checkpoint "
                              f"lacks {', '.join(missing)}")
        ordered = tuple(parts[part] for part in stacks[key])
        first = ordered[0]
        rows = sum(part.shape[0] for part in ordered)
        out.append(PlanEntry(
            target_key=key, source_key=first.source_key, transform=(STACK_ROWS,),
            source_shape=(rows, *first.shape[1:]), source_dtype=first.source_dtype,
            shape=(rows, *first.shape[1:]), dtype=first.dtype, parts=ordered))
    return tuple(out)


def apply_plan_entry(entry: PlanEntry, tensor: torch.Tensor) -> torch.Tensor:
    """Turn the source tensor of ``entry`` into its output tensor.

    Args:
        entry: the plan entry.
        tensor: the tensor read from ``entry.source_key``.

    Returns:
        The output tensor, of ``entry.shape`` and ``entry.dtype``.

    Raises:
        ShapeError: the tensor's shape or dtype is not what the plan was made from.
    """
    if entry.parts:
        raise ShapeError(f"{entry.target_key} is stacked from {len(entry.parts)} tensors: "
                         "read it with plan_entry_value")
    if tuple(tensor.shape) != entry.source_shape or tensor.dtype != entry.source_dtype:
        raise ShapeError(
            f"{entry.source_key}: planned for {list(entry.source_shape)} "
            f"{entry.source_dtype}, got {list(tensor.shape)} {tensor.dtype}; the checkpoint "
            "changed since it was planned"
        )
    out = apply_transform(entry.transform, tensor)
    if out.dtype != entry.dtype:
        out = out.to(entry.dtype)
    return out


def plan_entry_value(entry: PlanEntry, load: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The output tensor of ``entry``, reading its source tensors with ``load``: one for a
    plain entry, each part's for a stacked one (concatenated along dim 0).

    Raises:
        ShapeError: a loaded tensor does not match its plan entry.
    """
    if not entry.parts:
        return apply_plan_entry(entry, load(entry.source_key))
    return stack_rows([plan_entry_value(part, load) for part in entry.parts])


def apply_plan(
    plan: ConversionPlan, load: Callable[[str], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(target key, tensor)`` for each plan entry, loading one source tensor at a time.

    Args:
        plan: the plan.
        load: reads one source tensor by key (e.g. from a lazy checkpoint reader).

    Raises:
        ShapeError: a loaded tensor does not match its plan entry.
    """
    for entry in plan.entries:
        yield entry.target_key, plan_entry_value(entry, load)


__all__ = [
    "LAYOUT_ROPE_STYLES",
    "TIED_OUTPUT_REASON",
    "ConversionPlan",
    "PlanEntry",
    "apply_plan",
    "apply_plan_entry",
    "check_native_shapes",
    "expected_native_shapes",
    "layout_rope_style",
    "layout_tensor_infos",
    "plan_conversion",
    "plan_entry_value",
    "stacked_row_ranges",
]
