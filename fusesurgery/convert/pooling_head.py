"""SigLIP's attention-pooling head: the tensors a native vision tower has no place for.

transformers' ``SiglipVisionModel`` ends in a multi-head attention-pooling head
(``vision_model.head.*``: a probe query, one ``nn.MultiheadAttention``, a LayerNorm and an
MLP) that gives ``pooler_output``. The native ViT, as torchtune's, has no such head, and
torchtune loads state dicts strictly, so the head cannot sit among the native weights. A
conversion to the native layout therefore keeps it in a file of its own beside them
(:data:`HEAD_FILE`, under transformers' names), and a conversion back to ``hf`` puts it back.
Where there is no head to put back, the transformers config must say so
(``vision_use_head: false``): otherwise transformers builds a head and initialises it at
random, and ``pooler_output`` is noise.

Fusion never uses the head (the fused model reads hidden states); ``fuse`` drops it, as
``DROPPED_KEYS`` records. Planning here is metadata only, like :mod:`fusesurgery.convert.plan`.

Shape notation: ``d`` the tower's width (``hidden_size``), ``ffn`` its MLP width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fusesurgery.config import VisionEncoderConfig
from fusesurgery.convert.keymaps import HF_VISION_PREFIX
from fusesurgery.convert.plan import PlanEntry, check_cast_dtype, list_keys
from fusesurgery.convert.transforms import IDENTITY
from fusesurgery.errors import ConfigError, ShapeError
from fusesurgery.families import VISION_FAMILIES
from fusesurgery.io.tensor_info import TensorInfo

if TYPE_CHECKING:
    import torch

Shape = tuple[int, ...]

# The file beside a native vision tower that holds its SigLIP head, and the config field that
# tells transformers whether a SiglipVisionModel has one.
HEAD_FILE = "siglip_head.safetensors"
HEAD_CONFIG_FIELD = "vision_use_head"
HEAD_PREFIX = HF_VISION_PREFIX + "head."
# transformers 5 saves a bare SiglipVisionModel without the ``vision_model.`` prefix.
_BARE_HEAD_PREFIX = "head."
# the tower families whose transformers model ends in such a head (``pooling_head``: SigLIP,
# SigLIP2 NaFlex)
HEAD_FAMILIES: tuple[str, ...] = tuple(
    name for name, family in VISION_FAMILIES.items() if family.pooling_head)


def head_shapes(config: VisionEncoderConfig) -> dict[str, Shape]:
    """Every tensor of the pooling head a SigLIP tower of ``config`` has, by its transformers
    name (the ``vision_model.`` spelling, which transformers 4 and 5 both load).

    Returns:
        key -> shape: the probe ``[1, 1, d]``, the packed q/k/v input projection
        ``[3 * d, d]``, the output projection, the LayerNorm and the ``d -> ffn -> d`` MLP.
    """
    d, ffn = config.embed_dim, config.intermediate_dim
    return {
        HEAD_PREFIX + "probe": (1, 1, d),
        HEAD_PREFIX + "attention.in_proj_weight": (3 * d, d),
        HEAD_PREFIX + "attention.in_proj_bias": (3 * d,),
        HEAD_PREFIX + "attention.out_proj.weight": (d, d),
        HEAD_PREFIX + "attention.out_proj.bias": (d,),
        HEAD_PREFIX + "layernorm.weight": (d,),
        HEAD_PREFIX + "layernorm.bias": (d,),
        HEAD_PREFIX + "mlp.fc1.weight": (ffn, d),
        HEAD_PREFIX + "mlp.fc1.bias": (ffn,),
        HEAD_PREFIX + "mlp.fc2.weight": (d, ffn),
        HEAD_PREFIX + "mlp.fc2.bias": (d,),
    }


def head_key(key: str) -> str | None:
    """The transformers name of ``key`` when it belongs to a SigLIP pooling head, else None.

    ``head.probe`` (transformers 5's bare spelling) and ``vision_model.head.probe`` are both
    ``vision_model.head.probe``.
    """
    if key.startswith(HEAD_PREFIX):
        return key
    if key.startswith(_BARE_HEAD_PREFIX):
        return HF_VISION_PREFIX + key
    return None


def plan_pooling_head(
    tensors: Mapping[str, TensorInfo],
    config: VisionEncoderConfig,
    *,
    origin: str,
    dtype: torch.dtype | None = None,
    head_only: bool = False,
) -> tuple[PlanEntry, ...]:
    """Plan carrying a SigLIP pooling head, from metadata alone.

    Args:
        tensors: key -> metadata: a whole transformers vision checkpoint (the head is picked
            out of it), or with ``head_only`` a :data:`HEAD_FILE`, every key of which must be
            a head key.
        config: the tower's resolved config; a family without a pooling head (CLIP) plans
            nothing.
        origin: the file the tensors come from, for messages.
        dtype: cast the head's tensors to this dtype (as the rest of the tower); None keeps
            them.
        head_only: ``tensors`` is a head file rather than a whole checkpoint.

    Returns:
        One identity (or cast) entry per head tensor, in source order, whose target key is
        its transformers name; empty when the checkpoint has no head.

    Raises:
        ConfigError: a head with missing, extra or misshapen tensors (a half head would load
            into transformers with the rest re-initialised at random), keys in a head file
            that belong to no head, or a bad ``dtype``.
        ShapeError: a head tensor that is not floating point.
    """
    check_cast_dtype(dtype)
    if config.family not in HEAD_FAMILIES:
        return ()
    found = {key: name for key in tensors if (name := head_key(key)) is not None}
    if head_only:
        strays = [key for key in tensors if key not in found]
        if strays:
            raise ConfigError(f"{origin} holds {len(strays)} keys of no SigLIP pooling head: "
                              f"{list_keys(strays)}")
    if not found:
        return ()
    expected = head_shapes(config)
    names = set(found.values())
    missing = [key for key in expected if key not in names]
    extra = [key for key, name in found.items() if name not in expected]
    mismatched = [
        f"{key} has shape {list(tensors[key].shape)}, expected {list(expected[name])}"
        for key, name in found.items()
        if name in expected and tuple(tensors[key].shape) != expected[name]
    ]
    if missing or extra or mismatched:
        problem = (f"lacks {list_keys(missing)}" if missing else
                   f"has unknown tensors {list_keys(extra)}" if extra else mismatched[0])
        raise ConfigError(f"{origin}: the SigLIP pooling head {problem} (for the tower's width "
                          f"{config.embed_dim} and MLP width {config.intermediate_dim})")
    entries = []
    for key, name in found.items():
        info = tensors[key]
        if not info.dtype.is_floating_point:
            raise ShapeError(f"{origin}: {key} holds {str(info.dtype).removeprefix('torch.')} "
                             "values; a pooling head's weights are floating point")
        entries.append(PlanEntry(
            target_key=name, source_key=key, transform=(IDENTITY,),
            source_shape=tuple(info.shape), source_dtype=info.dtype, shape=tuple(info.shape),
            dtype=dtype if dtype is not None else info.dtype,
        ))
    return tuple(entries)


__all__ = [
    "HEAD_CONFIG_FIELD",
    "HEAD_FAMILIES",
    "HEAD_FILE",
    "HEAD_PREFIX",
    "head_key",
    "head_shapes",
    "plan_pooling_head",
]
