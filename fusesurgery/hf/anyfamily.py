"""``fuse --format transformers``: any decoder transformers' ``AutoModelForCausalLM`` builds and
any tower its ``AutoModel`` builds (or the vision half of a ``CLIPModel`` / ``SiglipModel`` /
``Aimv2Model`` pair), fused straight into the transformers export layout, streaming.

No fusesurgery module exists for these families and none is needed: the exported modeling file
builds the text model and the tower with transformers' Auto classes, so fusion needs only the
sizes of what it adds, read from the configs (:func:`read_decoder`, every choice recorded with
where it came from). The sources' tensors are copied byte for byte under one prefix each
(``language_model.`` / ``vision_tower.``, their own names after it), the new ones drawn as
``fuse`` draws them (each from its own generator, seeded from the seed and the tensor's native
fused name, so a family fusesurgery also writes natively gets the very values ``fuse`` +
``convert --to transformers`` gives).

``config.json`` holds the export's fields (see :mod:`fusesurgery.hf.export`) and, under
:data:`FUSE_RECORD_FIELD`, what fuse did: sources, choices, new tokens, seed. Reading one back
(:func:`checked_any_export`) checks every tensor against the shapes transformers' own classes
give for the configs it carries, on the meta device.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusesurgery import _json as standard_json
from fusesurgery.convert.tokenizer import TOKENIZER_FILES, add_special_tokens
from fusesurgery.errors import CheckpointError, ConfigError, ShapeError
from fusesurgery.hf.export import auto_map, template_files
from fusesurgery.hf.layout_choice import LAYOUTS, choose_layout
from fusesurgery.io import CheckpointSource, TensorInfo, open_checkpoint
from fusesurgery.io._files import file_fingerprint, read_side_file
from fusesurgery.surgery.export_layout import (
    CROSS_PREFIX,
    FUSE_RECORD_FIELD,
    FUSION_EMBEDDING_KEY,
    MODEL_CLASS,
    PROJECTION_PREFIX,
    TEXT_PREFIX,
    VISION_PREFIX,
    check_template_files,
    check_tensor_shapes,
    is_any_export,
)
from fusesurgery.surgery.export_layout import EXPORT_MODEL_TYPE as MODEL_TYPE
from fusesurgery.surgery.fuse_plan import (
    DEFAULT,
    FuseOptions,
    NewTensor,
    _check_tokens,
    resolve_fusion_layers,
)
from fusesurgery.surgery.fuse_plan import (
    FUSION_EMBEDDING_KEY as NATIVE_FUSION_EMBEDDING_KEY,
)
from fusesurgery.surgery.fused_config import EMBEDDING_INITS, PROJECTIONS, SOURCE_FILES_DIR
from fusesurgery.write.output_guard import check_destination, check_not_an_input, resolve_output
from fusesurgery.write.safetensors_writer import WriteResult, write_safetensors
from fusesurgery.write.shard_plan import DEFAULT_MAX_SHARD_SIZE
from fusesurgery.write.side_files import (
    DECODER_SIDE_FILES,
    ENCODER_SIDE_FILES,
    read_side_files,
    side_directory,
)

# config.json's record of a fuse straight into this layout (a converted export carries
# export.FUSION_CONFIG_FIELD instead)
# model types of a tower whose fusion reads its penultimate layer by default (as LLaVA);
# every other tower feeds its final hidden states (as PaliGemma's SigLIP)
PENULTIMATE_TOWERS = frozenset({"clip_vision_model"})
PAIR_VISION_PREFIX = "vision_model."  # a CLIPModel / SiglipModel / Aimv2Model's vision half
NORM_EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")
OUTPUT_EMBEDDING_KEY = "lm_head.weight"


def transformers_version() -> str:
    import transformers  # noqa: PLC0415 - only where a family must be known

    return transformers.__version__


def _family_error(role: str, model_type: object, saved_with: object) -> ConfigError:
    newer = (f"transformers >= {saved_with} (it was saved with it)" if saved_with
             else "a newer transformers")
    return ConfigError(f"the {role}'s family {model_type!r} is unknown to transformers "
                       f"{transformers_version()}: {newer} is needed")


def config_object(document: Mapping[str, Any], role: str, origin: object):
    """``document`` (a transformers config.json) as its transformers config class.

    Raises:
        ConfigError: no model_type, a family this transformers lacks (naming the version
            needed), or a config its class refuses.
    """
    from transformers import CONFIG_MAPPING  # noqa: PLC0415

    model_type = document.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{origin}: no model_type: not a transformers config.json")
    if model_type not in CONFIG_MAPPING:
        raise _family_error(role, model_type, document.get("transformers_version"))
    fields = {k: v for k, v in document.items() if k not in ("model_type",)}
    try:
        return CONFIG_MAPPING[model_type](**fields)
    except Exception as error:  # noqa: BLE001 - a config class may raise anything on bad input
        raise ConfigError(f"{origin}: transformers' {model_type} config refuses it: "
                          f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
                          ) from None


def check_causal_lm(model_type: str, saved_with: object) -> None:
    """Raises ConfigError unless ``AutoModelForCausalLM`` builds ``model_type``."""
    from transformers.models.auto.modeling_auto import (  # noqa: PLC0415
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"the decoder's family {model_type!r} has no causal language model "
                          f"in transformers {transformers_version()} (AutoModelForCausalLM "
                          "cannot build it)")


# towers that take NaFlex inputs (pre-cut patches, pixel_attention_mask, spatial_shapes)
NAFLEX_TOWERS = frozenset({"siglip2", "siglip2_vision_model"})


def check_tower_model(model_type: str, saved_with: object) -> None:
    """Raises ConfigError unless ``AutoModel`` builds ``model_type``."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES  # noqa: PLC0415

    if model_type not in MODEL_MAPPING_NAMES:
        raise ConfigError(f"the tower's family {model_type!r} has no model in transformers "
                          f"{transformers_version()} (AutoModel cannot build it)")


@dataclass(frozen=True)
class DecoderSizes:
    """What fusion needs to know of a decoder, from its config and its tensors' headers.

    Attributes:
        model_type: its transformers family.
        num_layers, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size,
            norm_eps, vocab_size: its sizes (the fusion layers take them).
        tied: its output projection is its input embedding (no ``lm_head.weight``).
        embedding_key: the input embedding table's key ``[vocab, d]``.
        layers_prefix: the text model's decoder layers' key prefix (``model.layers.``).
        dtype: the embedding table's dtype (the new tensors take it).
        choices: field -> where its value came from.
        norm_unit_offset: the fusion layers' RMSNorms are of the ``(1 + w)`` kind, as native
            ``fuse`` makes them for this family (Gemma's), their weights starting at zero.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    vocab_size: int
    tied: bool
    embedding_key: str
    layers_prefix: str
    dtype: Any
    choices: dict[str, str] = field(default_factory=dict)
    norm_unit_offset: bool = False


def fusion_norm_unit_offset(model_type: str) -> tuple[bool, str]:
    """Whether a ``model_type`` decoder's fusion layers get ``(1 + w)`` RMSNorms, and why: the
    kind native ``fuse`` gives them, its family's own (Gemma 2 / Gemma 3); Llama's ``w``
    kind for every other family."""
    from fusesurgery.convert.configs import HF_DECODER_FAMILIES  # noqa: PLC0415
    from fusesurgery.families import decoder_family  # noqa: PLC0415

    family = HF_DECODER_FAMILIES.get(model_type)
    if family is not None and decoder_family(family).fixed.get("norm_unit_offset", False):
        return True, (f"the (1 + w) kind of the {decoder_family(family).display_name} "
                      "decoder's own norms, as native fuse makes them")
    return False, "the w kind (Llama's), as native fuse makes them for this family"


@dataclass(frozen=True)
class TowerSizes:
    """What fusion needs of a vision tower.

    Attributes:
        model_type: the tower's transformers family (the vision config's, for a pair).
        hidden_size: its width ``d_e``.
        num_layers: its layers.
        config: its transformers config as a dict (a pair's ``vision_config``, with its
            model_type).
        keys: source key -> the tower's own name (a pair's vision half kept as it is).
        dropped: source key -> why it is not carried (a pair's text tower).
        dtype: its main dtype.
        num_cls_tokens: class tokens at the start of its output (its weights hold a class
            token: ``embeddings.cls_token`` / ``embeddings.class_embedding``).
        num_register_tokens: register tokens after them (``embeddings.register_tokens``'s
            rows, which its config's ``num_register_tokens`` must state).
    """

    model_type: str
    hidden_size: int
    num_layers: int
    config: dict[str, Any]
    keys: dict[str, str]
    dropped: dict[str, str]
    dtype: Any
    num_cls_tokens: int = 0
    num_register_tokens: int = 0


def _int_field(config, names: tuple[str, ...], origin: object, what: str) -> tuple[int, str]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    raise ConfigError(f"{origin}: no {what} ({' / '.join(names)}) in its config")


def _layers_prefix(keys: list[str], num_layers: int, origin: object) -> str:
    """The prefix ``P`` with ``P{i}.`` for every layer: the template reaches the layers as the
    text model's ``base_model.layers``."""
    candidates = {key[:key.index(".layers.") + len(".layers.")] for key in keys
                  if ".layers." in key}
    for prefix in sorted(candidates, key=len):
        if all(any(k.startswith(f"{prefix}{i}.") for k in keys) for i in range(num_layers)):
            return prefix
    raise ConfigError(f"{origin}: no decoder layers under a '.layers.N.' name for each of its "
                      f"{num_layers} layers; the transformers layout reaches a decoder's layers "
                      "as its base model's `layers`")


def _refuse_multimodal(document: Mapping[str, Any], role: str, origin: object) -> None:
    """A multimodal checkpoint one of whose parts a native family reads (a full Gemma 3's
    text half or SigLIP tower) is no causal LM or tower checkpoint this layout copies whole.

    Raises:
        ConfigError: such a checkpoint, named with what takes it instead.
    """
    from fusesurgery.convert.configs import HF_WRAPPED_PARTS  # noqa: PLC0415

    names = [document.get("model_type"), *(document.get("architectures") or ())]
    whole = next((name for name in names if isinstance(name, str)
                  and name in HF_WRAPPED_PARTS["decoder" if role == "decoder" else "vision"]),
                 None)
    if whole is not None:
        raise ConfigError(
            f"{origin}: a {whole} checkpoint is not a {role} saved alone, which the "
            f"transformers layout copies whole; the native layout reads its {role} (fuse "
            "without --format transformers, with a decoder and tower fusesurgery has modules "
            f"for), or save the {role} alone first")


def read_decoder(source: CheckpointSource, origin: object) -> DecoderSizes:
    """Sizes of an ``AutoModelForCausalLM`` checkpoint, from config.json and its headers, each
    size checked against the tensors that show it.

    Raises:
        ConfigError: no transformers config, a family transformers lacks or has no causal LM
            for, missing sizes, a tie flag the weights contradict.
        ShapeError: an embedding table of other sizes than the config's.
    """
    document = source.config if source.config_file == "config.json" else None
    if not isinstance(document, dict):
        raise ConfigError(f"{origin}: no transformers config.json beside the weights; the "
                          "transformers layout builds the decoder from it")
    _refuse_multimodal(document, "decoder", origin)
    config = config_object(document, "decoder", f"{origin}/config.json")
    check_causal_lm(config.model_type, document.get("transformers_version"))
    choices: dict[str, str] = {}
    hidden, name = _int_field(config, ("hidden_size",), origin, "hidden size")
    choices["hidden_size"] = name
    heads, name = _int_field(config, ("num_attention_heads",), origin, "attention heads")
    choices["fusion_num_heads"] = name
    kv = getattr(config, "num_key_value_heads", None)
    if isinstance(kv, int) and kv > 0:
        choices["fusion_num_kv_heads"] = "num_key_value_heads"
    else:
        kv = heads
        choices["fusion_num_kv_heads"] = "num_attention_heads (no num_key_value_heads)"
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        choices["fusion_head_dim"] = "head_dim"
    else:
        head_dim = hidden // heads
        choices["fusion_head_dim"] = "hidden_size // num_attention_heads"
    if heads % kv:
        raise ConfigError(f"{origin}: {heads} attention heads do not split into {kv} "
                          "key-value heads")
    ffn = getattr(config, "intermediate_size", None)
    if isinstance(ffn, int) and ffn > 0:
        choices["fusion_intermediate_size"] = "intermediate_size"
    else:
        ffn = 4 * hidden
        choices["fusion_intermediate_size"] = "4 * hidden_size (no intermediate_size)"
    eps = next(((getattr(config, n), n) for n in NORM_EPS_FIELDS
                if isinstance(getattr(config, n, None), float)), None)
    if eps is None:
        eps = (1e-5, "1e-5 (no norm epsilon in the config)")
    choices["ca_norm_eps"] = choices["qk_norm_eps"] = eps[1]
    unit_offset, why = fusion_norm_unit_offset(config.model_type)
    choices["fusion_norm_unit_offset"] = why
    layers, _ = _int_field(config, ("num_hidden_layers",), origin, "layer count")
    vocab, _ = _int_field(config, ("vocab_size",), origin, "vocabulary size")

    infos = source.infos()
    layers_prefix = _layers_prefix(list(infos), layers, origin)
    tables = [key for key, info in infos.items() if tuple(info.shape) == (vocab, hidden)
              and key != OUTPUT_EMBEDDING_KEY and not key.startswith(layers_prefix)]
    if len(tables) != 1:
        found = "none" if not tables else ", ".join(tables)
        raise ShapeError(f"{origin}: one input embedding table [{vocab}, {hidden}] (its "
                         f"config's vocab_size and hidden_size) expected, found {found}")
    tied = OUTPUT_EMBEDDING_KEY not in infos
    says_tied = getattr(config, "tie_word_embeddings", None)
    if says_tied is not None and bool(says_tied) != tied:
        raise ConfigError(f"{origin}: its config says tie_word_embeddings={says_tied} but the "
                          f"weights {'lack' if tied else 'hold'} {OUTPUT_EMBEDDING_KEY}")
    if not tied and tuple(infos[OUTPUT_EMBEDDING_KEY].shape) != (vocab, hidden):
        raise ShapeError(f"{origin}: {OUTPUT_EMBEDDING_KEY} is "
                         f"{list(infos[OUTPUT_EMBEDDING_KEY].shape)}, its config says "
                         f"[{vocab}, {hidden}]")
    _check_against_class(config, infos, origin)
    return DecoderSizes(
        model_type=config.model_type, num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, intermediate_size=ffn, norm_eps=eps[0],
        vocab_size=vocab, tied=tied, embedding_key=tables[0],
        layers_prefix=layers_prefix,
        dtype=infos[tables[0]].dtype, choices=choices, norm_unit_offset=unit_offset)


def _check_against_class(config, infos: Mapping[str, TensorInfo], origin: object) -> None:
    """The decoder's tensors are exactly the keys and shapes transformers' causal LM class,
    built on the meta device from its config.json, saves: what ``checked_any_export`` asks
    of the export, asked of the source before anything is written (a head count, MLP width
    or layer count the weights contradict would otherwise be copied into an export that its
    own ``validate`` refuses).

    Raises:
        ShapeError: missing or extra tensors, or a shape other than the config gives.
    """
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    expected = meta_model_shapes(AutoModelForCausalLM, config)
    check_tensor_shapes(infos, expected, origin, "config.json")


def meta_model_shapes(model_class, config) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict ``model_class.from_config(config)`` saves (tied
    parameters once, under their first name), built on the meta device.

    The names are the ones ``save_pretrained`` writes: a family whose module names differ
    from its checkpoints' (DINOv2's ``attention.attention.key`` is ``attention.k_proj`` in
    transformers 5) has its loading renames reverted, as ``save_pretrained`` reverts them.
    """
    import torch  # noqa: PLC0415
    from transformers.core_model_loading import revert_weight_conversion  # noqa: PLC0415

    with torch.device("meta"):
        model = model_class.from_config(config)
    tensors = dict(model.named_parameters())
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name, tensor in model.state_dict().items():
        if name not in every:  # a persistent buffer
            tensors[name] = tensor
    return {name: tuple(tensor.shape)
            for name, tensor in revert_weight_conversion(model, tensors).items()}


def read_tower(source: CheckpointSource, origin: object) -> TowerSizes:
    """The vision tower of an ``AutoModel`` checkpoint, or the vision half of a pair.

    Raises:
        ConfigError: no transformers config, a family transformers lacks, or a pair whose
            vision half's names are not its vision model's.
    """
    document = source.config if source.config_file == "config.json" else None
    if not isinstance(document, dict):
        raise ConfigError(f"{origin}: no transformers config.json beside the weights; the "
                          "transformers layout builds the tower from it")
    _refuse_multimodal(document, "tower", origin)
    config = config_object(document, "tower", f"{origin}/config.json")
    infos = source.infos()
    vision = getattr(config, "vision_config", None)
    if vision is None:
        check_tower_model(config.model_type, document.get("transformers_version"))
        tower_document = dict(document)
        keys = {key: key for key in infos}
        dropped: dict[str, str] = {}
        tower_config = config
    else:  # a pair: its vision half, under the names its vision model gives them
        from transformers import AutoModel  # noqa: PLC0415

        check_tower_model(vision.model_type, document.get("transformers_version"))
        tower_document = dict(document.get("vision_config") or {})
        tower_document["model_type"] = vision.model_type
        for inherited in ("dtype", "torch_dtype"):
            if inherited in document and inherited not in tower_document:
                tower_document[inherited] = document[inherited]
        half = {key for key in infos if key.startswith(PAIR_VISION_PREFIX)}
        own = set(meta_model_shapes(AutoModel, vision))
        if half == own:
            keys = {key: key for key in sorted(half)}
        elif {key.removeprefix(PAIR_VISION_PREFIX) for key in half} == own:
            keys = {key: key.removeprefix(PAIR_VISION_PREFIX) for key in sorted(half)}
        else:
            raise ConfigError(f"{origin}: its {PAIR_VISION_PREFIX}* tensors are not the "
                              f"{vision.model_type} vision model's")
        dropped = {key: "the pair's text side (fusion reads only its vision half)"
                   for key in infos if key not in keys}
        tower_config = vision
    hidden, _ = _int_field(tower_config, ("hidden_size",), origin, "hidden size")
    layers, _ = _int_field(tower_config, ("num_hidden_layers",), origin, "layer count")
    dtypes = [infos[key].dtype for key in keys if infos[key].is_floating_point]
    if not dtypes:
        raise CheckpointError(f"{origin}: no floating-point tensors in the vision tower")
    num_cls, num_registers = _prefix_tokens(tower_config, keys, infos, origin)
    return TowerSizes(model_type=tower_config.model_type, hidden_size=hidden,
                      num_layers=layers, config=tower_document, keys=keys, dropped=dropped,
                      dtype=max(set(dtypes), key=dtypes.count), num_cls_tokens=num_cls,
                      num_register_tokens=num_registers)


# a tower's own names of its class token and its registers (``[1, n, d_e]`` or ``[d_e]``)
CLASS_TOKEN_NAMES = ("embeddings.cls_token", "embeddings.class_embedding")
REGISTER_TOKENS_NAME = "embeddings.register_tokens"


def _prefix_tokens(config, keys: Mapping[str, str], infos: Mapping[str, TensorInfo],
                   origin: object) -> tuple[int, int]:
    """``(class tokens, register tokens)`` before the patches in a tower's output, from its
    weights, checked against its config's ``num_register_tokens``.

    Raises:
        ConfigError: the config's register count is not the weights'.
    """
    names = {name.removeprefix(PAIR_VISION_PREFIX): key for key, name in keys.items()}
    num_cls = int(any(name in names for name in CLASS_TOKEN_NAMES))
    registers = names.get(REGISTER_TOKENS_NAME)
    num_registers = 0 if registers is None else int(infos[registers].shape[-2])
    stated = getattr(config, "num_register_tokens", None) or 0
    if stated != num_registers:
        raise ConfigError(f"{origin}: its config.json states num_register_tokens {stated} and "
                          f"its weights hold {num_registers} register token(s)")
    return num_cls, num_registers


def fusion_tensors(decoder: DecoderSizes, vision_width: int, layers: tuple[int, ...],
                   projection: str, new_tokens: int, embedding_init: str,
                   dtype) -> list[tuple[str, NewTensor]]:
    """The tensors fusion adds, as ``(exported name, NewTensor)``; each NewTensor is named
    by its native fused key (which seeds its values, see ``make_new_tensor``).

    Shapes: per fusion layer at ``i`` the gated cross-attention layer (``ca_norm``, GQA
    ``attn`` with q/k RMSNorms, ``ca_scale``, ``mlp_norm``, SwiGLU ``mlp``, ``mlp_scale``),
    the new tokens' rows ``[n_new, d]`` and the projection head ``d_e -> d``. Linear weights
    start as torch's ``nn.Linear`` (uniform, bound ``1/sqrt(fan_in)``), norms at one (the
    ``(1 + w)`` kind at zero: the same norm), gates at zero.
    """
    d, h_d, ffn = decoder.hidden_size, decoder.head_dim, decoder.intermediate_size
    q_width, kv_width = decoder.num_heads * h_d, decoder.num_kv_heads * h_d
    norm = ("zeros",) if decoder.norm_unit_offset else ("ones",)

    def linear(out_features: int, in_features: int) -> tuple[tuple[int, ...], tuple]:
        return (out_features, in_features), ("uniform", 1.0 / math.sqrt(in_features))

    layer_shapes: list[tuple[str, tuple[int, ...], tuple]] = [
        ("ca_norm.scale", (d,), norm),
        ("attn.q_proj.weight", *linear(q_width, d)),
        ("attn.k_proj.weight", *linear(kv_width, d)),
        ("attn.v_proj.weight", *linear(kv_width, d)),
        ("attn.output_proj.weight", *linear(d, q_width)),
        ("attn.q_norm.scale", (h_d,), norm),
        ("attn.k_norm.scale", (h_d,), norm),
        ("ca_scale.scale", (1,), ("zeros",)),
        ("mlp_norm.scale", (d,), norm),
        ("mlp.w1.weight", *linear(ffn, d)),
        ("mlp.w2.weight", *linear(d, ffn)),
        ("mlp.w3.weight", *linear(ffn, d)),
        ("mlp_scale.scale", (1,), ("zeros",)),
    ]
    out: list[tuple[str, NewTensor]] = []
    for index in layers:
        for local, shape, init in layer_shapes:
            out.append((f"{CROSS_PREFIX}{index}.{local}",
                        NewTensor(f"decoder.layers.{index}.fusion_layer.{local}", shape, dtype,
                                  init)))
    if new_tokens:
        out.append((FUSION_EMBEDDING_KEY, NewTensor(
            NATIVE_FUSION_EMBEDDING_KEY, (new_tokens, d), dtype, ("embedding", embedding_init))))
    bound_in, bound_d = 1.0 / math.sqrt(vision_width), 1.0 / math.sqrt(d)
    head = ([("w1.weight", (d, vision_width), bound_in), ("w1.bias", (d,), bound_in),
             ("w2.weight", (d, d), bound_d), ("w2.bias", (d,), bound_d)]
            if projection == "mlp" else
            [("output.weight", (d, vision_width), bound_in), ("output.bias", (d,), bound_in)])
    for local, shape, bound in head:
        out.append((PROJECTION_PREFIX + local, NewTensor(
            f"encoder.projection.{local}", shape, dtype, ("uniform", bound))))
    return out


@dataclass(frozen=True)
class AnyFuseResult:
    """What ``fuse --format transformers`` wrote.

    Attributes:
        decoder: the decoder's sizes.
        tower: the tower's.
        config: the exported config.json.
        written: the files written.
        tokenizer_files: the tokenizer files written with the new tokens.
        new_parameters: elements of the new tensors.
        note: why this layout, when ``fuse`` chose it (a family with no native module).
    """

    decoder: DecoderSizes
    tower: TowerSizes
    config: dict[str, Any]
    written: WriteResult
    tokenizer_files: tuple[str, ...]
    new_parameters: int
    note: str | None = None


def _resolve_feature_layer(options: FuseOptions, tower: TowerSizes) -> tuple[int | None, str]:
    layer = options.encoder_layer
    if layer is DEFAULT:
        if tower.model_type in PENULTIMATE_TOWERS:
            return -2, f"{tower.model_type}'s default: the penultimate layer"
        return None, "the default for this tower: its final hidden states"
    if layer is not None and not (-tower.num_layers - 1 <= layer <= tower.num_layers):
        raise ConfigError(f"--encoder-layer {layer} is outside [-{tower.num_layers + 1}, "
                          f"{tower.num_layers}] for a {tower.num_layers}-layer encoder")
    return layer, "given"


def _resolve_encoder_tokens(options: FuseOptions, tower: TowerSizes,
                            origin: object) -> tuple[str, str]:
    """The tower's output tokens that feed the fusion, and why: as the native path chooses
    (its family's default where fusesurgery has one: DINOv2's and DINOv3's registers left
    out; every token otherwise).

    Raises:
        ConfigError: ``cls_and_patches`` for a tower with no class token.
    """
    tokens = options.encoder_tokens
    if tokens is DEFAULT:
        from fusesurgery.convert.configs import HF_VISION_FAMILIES  # noqa: PLC0415
        from fusesurgery.surgery.fuse_plan import ENCODER_TOKENS_DEFAULTS  # noqa: PLC0415

        family = HF_VISION_FAMILIES.get(tower.model_type)
        if family is not None and tower.num_cls_tokens + tower.num_register_tokens:
            tokens = ENCODER_TOKENS_DEFAULTS[family]
            return tokens, f"{tower.model_type}'s default, as the native layout's"
        return "all", "the default for this tower: every output token"
    if tokens == "cls_and_patches" and not tower.num_cls_tokens:
        raise ConfigError(f"--encoder-tokens cls_and_patches: {origin} ({tower.model_type}) has "
                          "no class token; its output tokens are all patches (patches or all)")
    return tokens, "given"


def _check_not_swapped(decoder: CheckpointSource, encoder: CheckpointSource) -> None:
    """Raises ConfigError when an input is already a fused export, or the ENCODER is a causal
    LM and the DECODER is not (swapped)."""
    from transformers.models.auto.modeling_auto import (  # noqa: PLC0415
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )

    def model_type(source: CheckpointSource) -> object:
        document = source.config if source.config_file == "config.json" else None
        return document.get("model_type") if isinstance(document, dict) else None

    for source, role in ((decoder, "DECODER"), (encoder, "ENCODER")):
        if model_type(source) == MODEL_TYPE:
            raise ConfigError(f"{role} is already a fused model (a transformers export); fuse "
                              "takes an unfused vision tower and decoder (see fusesurgery "
                              "unfuse)")
    if (model_type(encoder) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type(decoder) not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        raise ConfigError("the encoder and the decoder are swapped: give the vision tower first "
                          "(fusesurgery fuse ENCODER DECODER)")


def _source_record(source: CheckpointSource, given: object, family: str,
                   kept: list[str], dropped: Mapping[str, str]) -> dict[str, Any]:
    hub = {"hub": source.hub.record()} if source.hub is not None else {}
    return {
        "path": str(given), **hub, "format": source.format, "family": family,
        "config_file": source.config_file, "total_bytes": source.total_bytes,
        "files": [file_fingerprint(Path(file)) for file in source.files],
        "kept_files": kept, "dropped": dict(dropped),
        "tensor_dtypes": sorted({str(i.dtype).removeprefix("torch.")
                                 for i in source.infos().values()}),
    }


def _dtype_text(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fuse_transformers(
    encoder_path: str | os.PathLike[str],
    decoder_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    options: FuseOptions | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    durable: bool = True,
) -> AnyFuseResult:
    """Fuse a vision tower into a decoder, written as a transformers model directory.

    The sources' tensors are copied unchanged (the kernel copies the bytes) under
    ``language_model.`` / ``vision_tower.`` and their own names; the new tensors are drawn
    one at a time. Built from config.json files and safetensors headers; transformers is
    imported for its config classes and family tables only, no model is instantiated but,
    on the meta device, a pair's vision half, to learn its names, and the decoder's causal
    LM class, whose keys and shapes the decoder's tensors are checked to be.

    Args:
        encoder_path: an ``AutoModel`` vision tower, or a CLIP / SigLIP / AIMv2 pair.
        decoder_path: an ``AutoModelForCausalLM`` checkpoint.
        out_dir: the output directory (atomic; never an input, inside one or holding one).
        options: where and how to fuse (``dtype`` is refused: the sources' bytes are kept).
        max_shard_size: largest shard.
        overwrite: replace an earlier fusesurgery output.
        on_progress: called with ``(bytes written, total bytes)`` after each tensor.
        durable: fsync before the output appears.

    Returns:
        What was fused and written.

    Raises:
        FuseSurgeryError: unreadable inputs, families transformers lacks, configs the weights
            contradict, bad options, or an output that cannot be written. Nothing is left at
            ``out_dir`` on any failure.
    """
    from fusesurgery._version import __version__  # noqa: PLC0415

    options = options or FuseOptions()
    if options.dtype is not None:
        raise ConfigError("--dtype is not supported with --format transformers: the sources' "
                          "tensors are copied as they are")
    if options.projection not in PROJECTIONS:
        raise ConfigError(f"unknown projection {options.projection!r}; valid: "
                          f"{', '.join(PROJECTIONS)}")
    if options.embedding_init not in EMBEDDING_INITS:
        raise ConfigError(f"unknown embedding init {options.embedding_init!r}; valid: "
                          f"{', '.join(EMBEDDING_INITS)}")
    tokens = _check_tokens(options.new_tokens)
    if not tokens:
        raise ConfigError("the transformers layout needs a new token to place the image by "
                          "(--new-token)")
    with ExitStack() as stack:
        encoder = stack.enter_context(open_checkpoint(encoder_path))
        decoder = stack.enter_context(open_checkpoint(decoder_path))
        inputs = (*decoder.paths_read, *encoder.paths_read)
        out = resolve_output(out_dir)
        check_not_an_input(out, inputs)
        check_destination(out, overwrite)
        _check_not_swapped(decoder, encoder)
        dec = read_decoder(decoder, decoder_path)
        tower = read_tower(encoder, encoder_path)
        layers = resolve_fusion_layers(options, dec.num_layers)
        feature_layer, feature_why = _resolve_feature_layer(options, tower)
        encoder_tokens, tokens_why = _resolve_encoder_tokens(options, tower, encoder_path)
        new = fusion_tensors(dec, tower.hidden_size, layers, options.projection, len(tokens),
                             options.embedding_init, dec.dtype)

        extra: dict[str, bytes | str] = {}
        kept: dict[str, list[str]] = {}
        tokenizer_written: tuple[str, ...] = ()
        for part, source, names in (("decoder", decoder, DECODER_SIDE_FILES),
                                    ("encoder", encoder, ENCODER_SIDE_FILES)):
            directory = side_directory(source)
            files = read_side_files(directory, names)
            own = {**files, "config.json": read_side_file(directory / "config.json")}
            for name, content in own.items():
                extra[f"{SOURCE_FILES_DIR}/{part}/{name}"] = content
            kept[part] = sorted(own)
            if part == "decoder":
                tokenizer = {n: c for n, c in files.items() if n in TOKENIZER_FILES}
                if tokenizer:
                    tokenizer = add_special_tokens(tokenizer, list(tokens), dec.vocab_size)
                    tokenizer_written = tuple(sorted(tokenizer))
                files = {**files, **tokenizer}
            extra.update(files)

        choices = {
            "fusion_layers": (f"layers {list(options.fusion_layers)}" if options.fusion_layers
                              is not None else f"one in every {options.every} of the "
                              f"decoder's {dec.num_layers} layers"),
            **{name: f"the decoder's {why}" for name, why in dec.choices.items()},
            "vision_feature_layer": feature_why,
            "encoder_tokens": tokens_why,
            "fusion dtype": f"the decoder's embedding table's ({_dtype_text(dec.dtype)})",
        }
        record = {
            "version": __version__,
            "layout": "transformers",
            "transformers_version": transformers_version(),
            "sources": {
                "decoder": _source_record(decoder, decoder_path, dec.model_type,
                                          kept["decoder"], {}),
                "encoder": _source_record(encoder, encoder_path, tower.model_type,
                                          kept["encoder"], tower.dropped),
            },
            "choices": choices,
            "embedding_init": options.embedding_init,
            "seed": options.seed,
            "trained": False,
        }
        document = {
            "architectures": [MODEL_CLASS],
            "model_type": MODEL_TYPE,
            "auto_map": auto_map(),
            "text_config": dict(decoder.config),
            "vision_config": tower.config,
            "fusion_layers": list(layers),
            "fusion_first": options.fusion_first,
            "ca_norm_eps": dec.norm_eps,
            "qk_norm_eps": dec.norm_eps,
            "fusion_norm_unit_offset": dec.norm_unit_offset,
            "fusion_num_heads": dec.num_heads,
            "fusion_num_kv_heads": dec.num_kv_heads,
            "fusion_head_dim": dec.head_dim,
            "fusion_intermediate_size": dec.intermediate_size,
            "hidden_size": dec.hidden_size,
            "vision_hidden_size": tower.hidden_size,
            "text_vocab_size": dec.vocab_size,
            "fusion_vocab_size": len(tokens),
            "image_token_id": dec.vocab_size + (tokens.index("<|image|>")
                                                if "<|image|>" in tokens else 0),
            "new_tokens": [{"token": t, "id": dec.vocab_size + i} for i, t in enumerate(tokens)],
            "projection": options.projection,
            "vision_feature_layer": feature_layer,
            "encoder_tokens": encoder_tokens,
            "vision_num_cls_tokens": tower.num_cls_tokens,
            "vision_num_register_tokens": tower.num_register_tokens,
            "vision_naflex": tower.model_type in NAFLEX_TOWERS,
            "tie_word_embeddings": dec.tied,
            "dtype": _dtype_text(dec.dtype),
            FUSE_RECORD_FIELD: record,
        }
        extra["config.json"] = standard_json.dumps(document, indent=2) + "\n"
        extra.update(template_files())

        infos: list[TensorInfo] = []
        producers: dict[str, Callable[[], Any]] = {}
        new_shard_at: set[str] = set()

        def copied(source: CheckpointSource, key: str):
            region = source.file_region(key)
            return region if region is not None else source.get_tensor(key)

        for source, names in ((decoder, {key: key for key in decoder.infos()}),
                              (encoder, tower.keys)):
            prefix = TEXT_PREFIX if source is decoder else VISION_PREFIX
            for index, (key, name) in enumerate(names.items()):
                info = source.infos()[key]
                infos.append(TensorInfo(prefix + name, tuple(info.shape), info.dtype))
                producers[prefix + name] = lambda s=source, k=key: copied(s, k)
                if index == 0:
                    new_shard_at.add(prefix + name)

        from fusesurgery.surgery.new_params import (  # noqa: PLC0415
            embedding_stats,
            make_new_tensor,
        )

        stats_cache: list = []

        def stats():
            if not stats_cache:
                stats_cache.append(embedding_stats(
                    decoder.get_tensor(dec.embedding_key),
                    with_std=options.embedding_init == "normal"))
            return stats_cache[0]

        for index, (name, spec) in enumerate(new):
            infos.append(TensorInfo(name, spec.shape, spec.dtype))
            producers[name] = lambda s=spec: make_new_tensor(s, options.seed, stats)
            if index == 0:
                new_shard_at.add(name)
        written = write_safetensors(
            out, infos, lambda key: producers[key](), new_shard_at=new_shard_at,
            max_shard_size=max_shard_size, extra_files=extra, overwrite=overwrite,
            on_progress=on_progress, durable=durable, inputs=inputs)
    return AnyFuseResult(decoder=dec, tower=tower, config=document, written=written,
                         tokenizer_files=tokenizer_written,
                         new_parameters=sum(math.prod(s.shape) for _, s in new))


def fuse(encoder: str | os.PathLike[str], decoder: str | os.PathLike[str],
         out_dir: str | os.PathLike[str], *, format: str | None = None,
         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
         on_progress: Callable[[int, int], None] | None = None, durable: bool = True,
         decoder_overrides: Mapping[str, Any] | None = None,
         encoder_overrides: Mapping[str, Any] | None = None, **options: Any):
    """``fusesurgery fuse ENCODER DECODER -o OUT [--format F]`` as a function.

    Args:
        encoder: the vision tower checkpoint.
        decoder: the decoder checkpoint.
        out_dir: the output directory.
        format: ``native`` (fusesurgery's fused checkpoint, ``fuse_checkpoints``),
            ``transformers`` (a transformers model directory, :func:`fuse_transformers`), or
            None: native unless a source's family has no native module (:func:`choose_layout`).
        max_shard_size, overwrite, on_progress, durable: as ``fuse_checkpoints``.
        decoder_overrides, encoder_overrides: native only (a transformers config is used as
            it is).
        **options: ``fuse``'s options (``every``, ``layers``, ``fusion_after``,
            ``new_tokens``, ``embedding_init``, ``encoder_layer``, ``encoder_tokens``,
            ``projection``, ``dtype``,
            ``seed``).

    Returns:
        A ``FuseResult`` (native) or an :class:`AnyFuseResult` (transformers; its ``note``
        says why that layout when it was not asked for).

    Raises:
        FuseSurgeryError: an unknown format, and see the two writers.
    """
    from fusesurgery.write.fuse_checkpoint import (  # noqa: PLC0415
        fuse_checkpoints,
        fuse_options,
    )

    if format is not None and format not in LAYOUTS:
        raise ConfigError(f"unknown format {format!r}; valid: {', '.join(LAYOUTS)}")
    note = None
    if format is None:
        format, note = choose_layout(encoder, decoder)
    fuse_options_ = fuse_options(**options)
    common = dict(max_shard_size=max_shard_size, overwrite=overwrite, on_progress=on_progress,
                  durable=durable)
    if format == "native":
        return fuse_checkpoints(encoder, decoder, out_dir, options=fuse_options_,
                                decoder_overrides=decoder_overrides,
                                encoder_overrides=encoder_overrides, **common)
    if decoder_overrides or encoder_overrides:
        raise ConfigError("--num-heads, --head-dim and the other config overrides are not "
                          "supported with the transformers layout: its configs are used as "
                          "they are")
    result = fuse_transformers(encoder, decoder, out_dir, options=fuse_options_, **common)
    return dataclasses.replace(result, note=note)


# --- reading one back -------------------------------------------------------------------------




def _positive(document: Mapping[str, Any], name: str, origin: object) -> int:
    value = document.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{origin}: {name} must be a positive integer, got {value!r}")
    return value


def expected_fusion_shapes(document: Mapping[str, Any], origin: object) -> dict[str, tuple]:
    """Exported fusion name -> shape, from the export's config.json fields.

    Raises:
        ConfigError: a missing or malformed field.
    """
    sizes = {name: _positive(document, name, origin) for name in (
        "hidden_size", "fusion_num_heads", "fusion_num_kv_heads", "fusion_head_dim",
        "fusion_intermediate_size", "vision_hidden_size", "text_vocab_size",
        "fusion_vocab_size")}
    layers = document.get("fusion_layers")
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise ConfigError(f"{origin}: fusion_layers must be a list of layer indices")
    projection = document.get("projection")
    if projection not in PROJECTIONS:
        raise ConfigError(f"{origin}: unknown projection {projection!r}")
    import torch  # noqa: PLC0415

    decoder = DecoderSizes(
        model_type="", num_layers=0, hidden_size=sizes["hidden_size"],
        num_heads=sizes["fusion_num_heads"], num_kv_heads=sizes["fusion_num_kv_heads"],
        head_dim=sizes["fusion_head_dim"], intermediate_size=sizes["fusion_intermediate_size"],
        norm_eps=0.0, vocab_size=sizes["text_vocab_size"], tied=False, embedding_key="",
        layers_prefix="", dtype=torch.float32)
    return {name: spec.shape for name, spec in fusion_tensors(
        decoder, sizes["vision_hidden_size"], tuple(layers), projection,
        sizes["fusion_vocab_size"], "zeros", torch.float32)}


def checked_any_export(source: CheckpointSource, path: object) -> dict[str, tuple[int, ...]]:
    """Exported name -> shape, checked: the modeling files are there, transformers knows both
    families, and the tensors are exactly the keys and shapes that transformers' classes
    (built on the meta device from ``text_config`` / ``vision_config``) and the fusion fields
    give.

    Raises:
        FuseSurgeryError: a missing modeling file, a family this transformers lacks, or
            tensors other than the configs describe (an edited config.json, a lost shard).
    """
    document = source.config
    check_template_files(side_directory(source), path)
    origin = f"{path}/config.json"
    text, vision = document.get("text_config"), document.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ConfigError(f"{origin}: text_config and vision_config must be objects")
    from transformers import AutoModel, AutoModelForCausalLM  # noqa: PLC0415

    text_config = config_object(text, "decoder", f"{origin}: text_config")
    check_causal_lm(text_config.model_type, text.get("transformers_version"))
    vision_config = config_object(vision, "tower", f"{origin}: vision_config")
    check_tower_model(vision_config.model_type, vision.get("transformers_version"))
    expected = {TEXT_PREFIX + k: v for k, v in
                meta_model_shapes(AutoModelForCausalLM, text_config).items()}
    expected.update({VISION_PREFIX + k: v for k, v in
                     meta_model_shapes(AutoModel, vision_config).items()})
    fusion = expected_fusion_shapes(document, origin)
    if document.get("hidden_size") != getattr(text_config, "hidden_size", None):
        raise ShapeError(f"{origin}: hidden_size {document.get('hidden_size')} is not its "
                         f"text_config's {getattr(text_config, 'hidden_size', None)}")
    expected.update(fusion)
    infos = source.infos()
    check_tensor_shapes(infos, expected, path, "config.json")
    return expected


__all__ = ["FUSE_RECORD_FIELD", "AnyFuseResult", "DecoderSizes", "TowerSizes",
           "check_template_files", "checked_any_export", "choose_layout",
           "expected_fusion_shapes", "fuse", "fuse_transformers", "fusion_tensors",
           "is_any_export", "read_decoder", "read_tower"]
