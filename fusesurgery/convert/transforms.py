"""Tensor transforms applied while converting between layouts: small pure functions.

The only layout difference that touches values is RoPE's pairing. Meta's reference code rotates
INTERLEAVED pairs ``(x[2j], x[2j+1])`` of each head; transformers rotates HALVES
``(x[j], x[j + h_d/2])``. Hugging Face q/k projections are therefore stored with each head's
output rows permuted so that the half-split rotation computes the same thing. The native layout
follows torchtune, family by family (``fusesurgery.config.NATIVE_ROPE_STYLE``): Llama and
Mistral are interleaved, so HF -> native undoes that permutation
(:func:`permute_qk_to_native`: rotate-half order -> interleaved order) and native -> HF redoes
it (:func:`permute_qk_from_native`); Qwen2 and Qwen3 are rotate-half, so their HF and native
rows are the same and only Meta <-> native would need a permutation. A q/k norm's ``[h_d]``
scale is one head's row order, permuted like a single head. The plan picks the transform from the
two layouts' pairings. Both are pure row reorderings, so round trips are bitwise.

CLIP's class embedding ``[d_e]`` and position table ``[n_tokens, d_e]`` have the same shapes in
both layouts, so the vision tower needs no transform.

A transform in a plan is plain data, ``(name, *int_args)``, looked up in ``TRANSFORMS``.

Some layouts stack several native tensors in one (Phi-3's ``qkv_proj``: the q, k and v rows;
``gate_up_proj``: w1's rows, then w3's). Reading one part is :func:`take_rows` (a byte range of
the stacked tensor, which the writers copy without reading the rest); writing the stacked
tensor is :func:`stack_rows` over the parts, each read on its own (``STACK_ROWS`` in a plan
entry with ``parts``). The two are inverses, so the round trip is bitwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fusesurgery.errors import ShapeError

if TYPE_CHECKING:
    import torch

IDENTITY = "identity"
TAKE_ROWS = "take_rows"
STACK_ROWS = "stack_rows"
PERMUTE_QK_TO_NATIVE = "permute_qk_to_native"
PERMUTE_QK_FROM_NATIVE = "permute_qk_from_native"

Transform = tuple  # (name: str, *args: int)


def _check_qk_shape(tensor: torch.Tensor, num_heads: int, head_dim: int, what: str) -> None:
    if head_dim % 2:
        raise ShapeError(f"{what}: head_dim {head_dim} is odd; RoPE rotates pairs of dims")
    if tensor.dim() not in (1, 2) or tensor.shape[0] != num_heads * head_dim:
        raise ShapeError(
            f"{what}: expected a [{num_heads}*{head_dim}, ...] q/k weight or bias, "
            f"got shape {list(tensor.shape)}"
        )


def permute_qk_to_native(tensor: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder a q/k projection from rotate-half RoPE order (Hugging Face) to interleaved order
    (Meta; native Llama and Mistral).

    Within each head, row ``half * h_d/2 + j`` (``half`` in {0, 1}) moves to ``2 * j + half``.

    Args:
        tensor: ``[n * h_d, d]`` weight or ``[n * h_d]`` bias (Qwen2).
        num_heads: ``n``: query heads for q, key/value heads for k.
        head_dim: ``h_d``, even.

    Returns:
        A new contiguous tensor of the same shape and dtype.

    Raises:
        ShapeError: the leading dim is not ``n * h_d`` or ``h_d`` is odd.
    """
    _check_qk_shape(tensor, num_heads, head_dim, PERMUTE_QK_TO_NATIVE)
    rest = tensor.shape[1:]
    # [n, 2 halves, h_d/2, ...] -> [n, h_d/2, 2, ...]: pairs become adjacent rows.
    grouped = tensor.reshape(num_heads, 2, head_dim // 2, *rest).transpose(1, 2)
    return grouped.reshape(num_heads * head_dim, *rest).contiguous()


def permute_qk_from_native(tensor: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder a q/k projection from interleaved RoPE order (Meta; native Llama and Mistral)
    to rotate-half order (Hugging Face).

    The inverse of :func:`permute_qk_to_native`.

    Args:
        tensor: ``[n * h_d, d]`` weight or ``[n * h_d]`` bias.
        num_heads: ``n``.
        head_dim: ``h_d``, even.

    Raises:
        ShapeError: the leading dim is not ``n * h_d`` or ``h_d`` is odd.
    """
    _check_qk_shape(tensor, num_heads, head_dim, PERMUTE_QK_FROM_NATIVE)
    rest = tensor.shape[1:]
    # [n, h_d/2, 2, ...] -> [n, 2, h_d/2, ...]: even rows first, then odd rows, per head.
    grouped = tensor.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2)
    return grouped.reshape(num_heads * head_dim, *rest).contiguous()


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def take_rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``tensor`` (a view): one part of a split table, e.g. the
    original rows or the fusion tokens of Mllama's ``[vocab + 8, d]`` embedding.

    Raises:
        ShapeError: the range does not lie inside the tensor.
    """
    if not 0 <= start <= stop <= tensor.shape[0]:
        raise ShapeError(f"rows [{start}, {stop}) lie outside a tensor of {tensor.shape[0]} rows")
    return tensor[start:stop]


def stack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts' rows one after the other (``[sum r_k, ...]``): a stacked tensor such as
    Phi-3's ``qkv_proj`` from its q, k and v parts; the inverse of :func:`take_rows` over
    consecutive ranges.

    Raises:
        ShapeError: no parts, or parts whose trailing dims or dtypes differ.
    """
    if not parts:
        raise ShapeError("nothing to stack: no parts")
    first = parts[0]
    for part in parts[1:]:
        if part.shape[1:] != first.shape[1:] or part.dtype != first.dtype:
            raise ShapeError(f"cannot stack a {list(part.shape)} {part.dtype} part under a "
                             f"{list(first.shape)} {first.dtype} one")
    import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

    return torch.cat(list(parts), dim=0)


TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {
    IDENTITY: _identity,
    PERMUTE_QK_TO_NATIVE: permute_qk_to_native,
    PERMUTE_QK_FROM_NATIVE: permute_qk_from_native,
    TAKE_ROWS: take_rows,
}

# Each transform's inverse, by name; checked to be a two-way table below.
INVERSE_TRANSFORMS: dict[str, str] = {
    IDENTITY: IDENTITY,
    PERMUTE_QK_TO_NATIVE: PERMUTE_QK_FROM_NATIVE,
    PERMUTE_QK_FROM_NATIVE: PERMUTE_QK_TO_NATIVE,
}
# (a row range has no inverse on its own: the other part of the split holds the other rows)
assert all(INVERSE_TRANSFORMS[INVERSE_TRANSFORMS[n]] == n for n in INVERSE_TRANSFORMS), (
    "bad inverses")


# Transforms that only reorder a tensor's rows (slices along dim 0); a writer may then gather
# the rows from the source file instead of materialising the result.
ROW_PERMUTATIONS: frozenset[str] = frozenset({PERMUTE_QK_TO_NATIVE, PERMUTE_QK_FROM_NATIVE})


def row_order(transform: Transform, num_rows: int) -> tuple[int, ...] | None:
    """For a transform that only reorders rows, the source row of each output row.

    Args:
        transform: a ``(name, *args)`` transform.
        num_rows: the tensor's leading dim.

    Returns:
        ``order`` with ``output[i] == source[order[i]]`` for every row ``i``, or None when the
        transform is not a pure row reordering.

    Raises:
        ShapeError: the transform does not fit ``num_rows`` rows.
    """
    if transform[0] not in ROW_PERMUTATIONS:
        return None
    import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

    # Applying the transform to the row numbers themselves yields where each row comes from.
    order = apply_transform(transform, torch.arange(num_rows))
    return tuple(order.tolist())


def apply_transform(transform: Transform, tensor: torch.Tensor) -> torch.Tensor:
    """Apply a ``(name, *args)`` transform to a tensor.

    Raises:
        ShapeError: the transform is unknown or does not fit the tensor.
    """
    name, *args = transform
    try:
        function = TRANSFORMS[name]
    except KeyError:
        raise ShapeError(
            f"unknown tensor transform {name!r}; valid: {', '.join(sorted(TRANSFORMS))}"
        ) from None
    return function(tensor, *args)


def invert_transform(transform: Transform) -> Transform:
    """The transform that undoes ``transform`` (same arguments, inverse name)."""
    name, *args = transform
    if name not in INVERSE_TRANSFORMS:
        raise ShapeError(f"transform {name!r} has no inverse")
    return (INVERSE_TRANSFORMS[name], *args)


__all__ = [
    "IDENTITY",
    "INVERSE_TRANSFORMS",
    "PERMUTE_QK_FROM_NATIVE",
    "PERMUTE_QK_TO_NATIVE",
    "ROW_PERMUTATIONS",
    "STACK_ROWS",
    "TAKE_ROWS",
    "TRANSFORMS",
    "Transform",
    "apply_transform",
    "invert_transform",
    "permute_qk_from_native",
    "permute_qk_to_native",
    "row_order",
    "stack_rows",
    "take_rows",
]
