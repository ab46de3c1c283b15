"""``save_fused``: write a (trained) ``DeepFusionModel`` back in the fused layout, streaming
and atomically, with an updated ``fusion_config.json``.

What is written always passes ``fusesurgery validate``: every tensor goes out in the dtype the
checkpoint the model was loaded from stores it in (or in the one ``dtype=`` asks for, which
``fusion_config.json`` then records), an original tensor that training did not change is
copied from the source's own bytes, and one that it did change is named in
``fusion_config.json`` so that nothing claims the identity any more.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fusesurgery import _json as standard_json
from fusesurgery.convert.plan import check_cast_dtype
from fusesurgery.errors import ConfigError, FuseSurgeryError, ValidationError
from fusesurgery.io import TensorInfo, open_checkpoint
from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
from fusesurgery.modules import (
    DeepFusionModel,
    FusionEmbedding,
    FusionLayer,
    TanhGate,
    TransformerDecoder,
)
from fusesurgery.surgery.fuse_plan import native_key_of
from fusesurgery.surgery.fused import FusedOpener, FusedView, build_fused_model, open_fused
from fusesurgery.surgery.fused_config import SOURCE_FILES_DIR, FusedConfig
from fusesurgery.write.fuse_checkpoint import readme_text
from fusesurgery.write.output_guard import check_not_an_input, resolve_output
from fusesurgery.write.safetensors_writer import WriteResult, write_safetensors
from fusesurgery.write.shard_plan import DEFAULT_MAX_SHARD_SIZE
from fusesurgery.write.side_files import DECODER_SIDE_FILES, ENCODER_SIDE_FILES, read_side_files

if TYPE_CHECKING:
    from fusesurgery.write.safetensors_writer import TensorSource

DECODER_PREFIX = "decoder."
# How many tensor names a refusal shows before the count.
NAMES_SHOWN = 3


def gate_values(model: DeepFusionModel | TransformerDecoder) -> dict[str, float]:
    """``{gate parameter name: value}`` of every ``TanhGate`` (state-dict spelling)."""
    state_names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    out = {}
    for module in model.modules():
        if isinstance(module, TanhGate):
            out[state_names[id(module.scale)]] = float(module.scale.detach().float().item())
    return dict(sorted(out.items()))


def _carried_files(directory: Path | None) -> dict[str, bytes]:
    """The side files of an earlier fused output (tokenizer, processor, sources' own)."""
    if directory is None or not directory.is_dir():
        return {}
    files = read_side_files(directory, (*DECODER_SIDE_FILES, *ENCODER_SIDE_FILES))
    kept = directory / SOURCE_FILES_DIR
    if kept.is_dir():
        for part_dir in sorted(p for p in kept.iterdir() if p.is_dir()):
            names = tuple(sorted(p.name for p in part_dir.iterdir() if p.is_file()))
            for name, content in read_side_files(part_dir, names).items():
                files[f"{SOURCE_FILES_DIR}/{part_dir.name}/{name}"] = content
    return files


def _stored_order(source_dir: Path | None, keys: list[str]) -> tuple[list[str], set[str]]:
    """The keys in the order (and with the shard boundaries) of the checkpoint the model was
    loaded from, so a saved model is laid out as ``fuse`` wrote it; else as given."""
    if source_dir is None or not source_dir.is_dir():
        return keys, set()
    try:
        with open_checkpoint(source_dir) as source:
            infos = source.infos()
    except FuseSurgeryError:
        return keys, set()
    if set(infos) != set(keys):
        return keys, set()
    first_of_file: dict[object, str] = {}
    for key, info in infos.items():
        first_of_file.setdefault(info.file, key)
    return list(infos), set(first_of_file.values())


def _names(keys: list[str]) -> str:
    """The first few of ``keys`` and how many there are, for a one-line message."""
    shown = ", ".join(keys[:NAMES_SHOWN])
    more = f" (+{len(keys) - NAMES_SHOWN} more)" if len(keys) > NAMES_SHOWN else ""
    return f"{shown}{more}"


def _model_state(model: object, config: FusedConfig) -> tuple[dict[str, torch.Tensor], bool]:
    """The model's tensors under their fused keys, and whether the model is the fused decoder
    alone (``load_fused(path, part="decoder")``), whose encoder side the source supplies.

    Raises:
        ConfigError: not a fused model.
    """
    if isinstance(model, DeepFusionModel):
        return {k: t.detach() for k, t in model.state_dict().items()}, False
    if isinstance(model, TransformerDecoder) and any(
            isinstance(m, FusionLayer | FusionEmbedding) for m in model.modules()):
        if config.encoder is None:
            raise ConfigError(
                "save_fused writes fusesurgery's fused layout, whose encoder side must be a "
                "native module; this decoder comes from an Mllama checkpoint, whose vision "
                "side is not one: save it with torch.save or safetensors yourself")
        return {DECODER_PREFIX + k: t.detach() for k, t in model.state_dict().items()}, True
    raise ConfigError(
        f"save_fused takes a DeepFusionModel or the fused TransformerDecoder that "
        f"load_fused(path, part='decoder') returns, not {type(model).__name__}")


def _expected_shapes(config: FusedConfig) -> dict[str, tuple[int, ...]]:
    """Fused key -> shape of the model ``config`` describes (built on ``meta``: no memory)."""
    with torch.device("meta"):
        model = build_fused_model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                what: str) -> None:
    """Refuse tensors that are not those of the model the config describes.

    Raises:
        ConfigError: missing, unexpected or reshaped keys (named).
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != expected[k])
    problems = [f"{len(keys)} {kind} ({_names(keys)})" for kind, keys in (
        ("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped)) if keys]
    if problems:
        raise ConfigError(f"{what} are not those of the model its fusion config describes: "
                          + "; ".join(problems))


@contextlib.contextmanager
def _open_source(source_dir: Path | None, expected: Mapping[str, tuple[int, ...]],
                 opener: FusedOpener = open_fused) -> Iterator[FusedView | None]:
    """The fused checkpoint the model was loaded from (opened by the reader that loaded it:
    ``fusesurgery.load_fused`` of a transformers export hands its own), when it still holds
    exactly the model's keys and shapes; else None."""
    with contextlib.ExitStack() as stack:
        view = None
        if source_dir is not None:
            try:
                view, _ = stack.enter_context(opener(source_dir))
            except FuseSurgeryError:  # gone or changed since: nothing to copy or compare
                view = None
        if view is not None and {k: tuple(info.shape) for k, info in view.infos().items()
                                 } != dict(expected):
            view = None
        yield view


def _fusion_dtype(config: FusedConfig, dtype: torch.dtype | None, view: FusedView | None,
                  state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The one dtype every new (fusion) tensor is written in."""
    if dtype is not None:
        return dtype
    if "fusion" in config.dtypes:
        return getattr(torch, config.dtypes["fusion"])
    new_keys = [k for k in state if native_key_of(k) is None]
    if view is not None and new_keys:
        return view.infos()[new_keys[0]].dtype
    return state[new_keys[0]].dtype if new_keys else torch.float32


def _original_dtype(key: str, tensor: torch.Tensor, config: FusedConfig,
                    dtype: torch.dtype | None, view: FusedView | None) -> torch.dtype:
    """The dtype an original tensor is written in: asked for, as stored, or as recorded."""
    if not tensor.is_floating_point():
        return tensor.dtype
    if dtype is not None:
        return dtype
    if view is not None:
        return view.infos()[key].dtype
    recorded = config.dtypes.get(native_key_of(key)[0])
    return getattr(torch, recorded) if recorded else tensor.dtype


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers of its element size (compared twice as fast as bytes)."""
    flat = tensor.reshape(-1).contiguous()
    return flat.view(_SAME_SIZE_INTEGER.get(flat.element_size(), torch.uint8))


_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf. A NaN or inf makes the sum NaN or inf, so a finite sum proves it; only
    a non-finite one (which may be an overflow) is checked element by element, at several
    times the cost."""
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to("cpu", dtype) if tensor.is_floating_point() else tensor.cpu()


def save_fused(
    model: DeepFusionModel | TransformerDecoder,
    out_dir: str | os.PathLike[str],
    *,
    config: FusedConfig | None = None,
    like: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    durable: bool = True,
) -> WriteResult:
    """Write ``model`` as a fused checkpoint: the same keys as ``fuse`` writes, tensor by tensor.

    The output passes ``fusesurgery validate``. By default every tensor keeps the dtype the
    checkpoint the model was loaded from stores it in, whatever ``load_fused(dtype=)`` cast
    it to for training: an original tensor whose values, in that dtype, are still the
    source's is copied from the source's bytes; one that training changed is written cast
    and named in ``fusion_config.json`` (``trained_originals``), as are the gate values.
    Without that checkpoint (a model built from a config, or one whose checkpoint was
    removed or replaced since) every original tensor is named: none can be shown unchanged.

    Args:
        model: a ``DeepFusionModel`` (usually from ``load_fused``, then trained), or the fused
            ``TransformerDecoder`` of ``load_fused(path, part="decoder")``, whose encoder side
            and projection head are then copied from the checkpoint it was loaded from.
        out_dir: the output directory, written atomically. It may not be, contain or lie in
            the directory the model was loaded from or ``like`` (the model's tensors may be
            mapped from those files), with or without ``overwrite``.
        config: the model's fusion config; default ``model.fused_config``.
        like: a fused checkpoint whose tokenizer, processor and source files are carried
            over; default ``model.fused_path``.
        dtype: write every floating-point tensor in this dtype instead, and record it in
            ``fusion_config.json`` (``validate``, ``push`` and ``unfuse`` then expect it).
        max_shard_size: largest shard.
        overwrite: replace an earlier fusesurgery output at ``out_dir``.
        durable: fsync before the output appears.

    Returns:
        The files written. ``fusion_config.json`` records the gate values, and ``trained``
        when any gate is nonzero or an original tensor changed (the model no longer
        computes what the decoder computed).

    Raises:
        ConfigError: no config given and the model has none; a model that is not a fused
            one, or whose tensors are not those its config describes; a fused decoder with no
            checkpoint to take its encoder side from; a ``dtype`` safetensors cannot store.
        ValidationError: a parameter holds NaN or inf (in the dtype it would be written in).
        WriteError: the output cannot be written, or overlaps a checkpoint the model reads.
    """
    check_cast_dtype(dtype)
    config = config if config is not None else getattr(model, "fused_config", None)
    if config is None:
        raise ConfigError("the model carries no fusion config (it was not loaded with "
                          "load_fused); pass config=")
    state, decoder_only = _model_state(model, config)
    source_dir = getattr(model, "fused_path", None)
    source_dir = Path(source_dir) if source_dir is not None else None
    like_dir = Path(like) if like is not None else source_dir
    out = resolve_output(out_dir)
    # Refused before any work: the model's own checkpoint is read (and may be mapped), like's
    # files are carried over.
    check_not_an_input(out, [source_dir, like_dir])
    expected = _expected_shapes(config)
    _check_keys({k: tuple(t.shape) for k, t in state.items()},
                {k: s for k, s in expected.items()
                 if not decoder_only or k.startswith(DECODER_PREFIX)},
                "the model's tensors")

    opener = getattr(model, "fused_opener", None) or open_fused
    with _open_source(source_dir, expected, opener) as view:
        if decoder_only and view is None:
            raise ConfigError(
                "a fused decoder alone is saved with the encoder side of the checkpoint it was "
                f"loaded from, and {source_dir or 'none is known'} no longer holds that model; "
                "save the whole DeepFusionModel (load_fused(path)) instead")
        fusion_dtype = _fusion_dtype(config, dtype, view, state)
        targets = {key: _original_dtype(key, tensor, config, dtype, view)
                   if native_key_of(key) is not None else fusion_dtype
                   for key, tensor in state.items()}
        if decoder_only:  # the encoder side and projection head come from the source
            for key, info in view.infos().items():
                if key in state:
                    continue
                if native_key_of(key) is None:
                    targets[key] = fusion_dtype
                elif dtype is not None and info.dtype.is_floating_point:
                    targets[key] = dtype
                else:
                    targets[key] = info.dtype
        copied, trained_originals = _compare_with_source(state, targets, view)

        gates = {}
        for key in gate_values(model):
            name = DECODER_PREFIX + key if decoder_only else key
            gates[name] = float(_cast(state[name], targets[name]).float().item())
        trained = (any(value != 0.0 for value in gates.values()) or bool(trained_originals))
        config = config.replace(trained=trained, gates=dict(sorted(gates.items())),
                                trained_originals=tuple(sorted(trained_originals)),
                                **_recorded_dtypes(config, targets, dtype, fusion_dtype))
        extra = _carried_files(like_dir)
        if like is None and view is not None and view.side_files is not None:
            # another layout's directory (a transformers export): its files as a native
            # checkpoint carries them; the sources' own kept files as they are
            extra = {**{name: content for name, content in extra.items()
                        if name.startswith(f"{SOURCE_FILES_DIR}/")}, **view.side_files()}
        extra[FUSION_CONFIG_FILE] = standard_json.dumps(config.to_dict(), indent=2) + "\n"
        sources = {part: str(record.get("path", "?")) for part, record in config.sources.items()}
        extra["README.md"] = readme_text(config, {"decoder": sources.get("decoder", "?"),
                                                  "encoder": sources.get("encoder", "?")})
        order, new_shard_at = _stored_order(source_dir, list(targets))
        infos = [TensorInfo(key, expected[key], targets[key]) for key in order]

        def produce(key: str) -> TensorSource:
            if key in copied:  # unchanged: the source's own bytes
                return view.file_region(key) or view.get_tensor(key)
            if key not in state:
                return _cast(view.get_tensor(key), targets[key])
            return _cast(state[key], targets[key])

        inputs = [path for path in (source_dir, like_dir) if path is not None]
        if view is not None:
            inputs += view.paths_read
        return write_safetensors(out, infos, produce, max_shard_size=max_shard_size,
                                 new_shard_at=new_shard_at,
                                 extra_files=extra, overwrite=overwrite, durable=durable,
                                 inputs=inputs)


class _CastBuffer:
    """One buffer, reused, for the casts of a pass over many tensors: a fresh allocation per
    tensor pays for faulting its pages in again each time."""

    def __init__(self) -> None:
        self._bytes = torch.empty(0, dtype=torch.uint8)

    def cast(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` on the CPU in ``dtype`` (floating point only); valid until the next
        call."""
        if not tensor.is_floating_point() or (tensor.dtype == dtype
                                              and tensor.device.type == "cpu"):
            return tensor.cpu()
        nbytes = tensor.numel() * dtype.itemsize
        if self._bytes.numel() < nbytes:
            self._bytes = torch.empty(0, dtype=torch.uint8)  # the old one goes first
            self._bytes = torch.empty(nbytes, dtype=torch.uint8)
        out = self._bytes[:nbytes].view(dtype).view(tensor.shape)
        out.copy_(tensor)
        return out


def _compare_with_source(state: Mapping[str, torch.Tensor], targets: Mapping[str, torch.dtype],
                         view: FusedView | None) -> tuple[set[str], list[str]]:
    """One pass over the model's tensors, each cast to the dtype it will be written in.

    Returns:
        The keys written from the source's bytes (an original tensor equal to the source's
        in the written dtype, or a source tensor the model does not hold), and the original
        tensors that differ from the source's (trained). Without a source (gone or changed
        since the model was loaded, or a model built from a config) no original tensor can be
        shown unchanged: every one is listed.

    Raises:
        ValidationError: tensors that are not finite once cast (NaN, inf, an overflow).
    """
    copied: set[str] = set()
    trained: list[str] = []
    non_finite: list[str] = []
    buffer = _CastBuffer()
    for key, tensor in state.items():
        written = buffer.cast(tensor, targets[key])
        if native_key_of(key) is not None and view is not None:
            stored = view.read_tensor(key)  # one pread: cheaper than faulting mapped pages in
            if stored.dtype == written.dtype and _bitwise_equal(stored, written):
                copied.add(key)  # the source's bytes, as fuse wrote them: nothing to check
                continue
            if not _bitwise_equal(_cast(stored, written.dtype), written):
                trained.append(key)
            del stored
        elif native_key_of(key) is not None:
            trained.append(key)
        if not _finite(written):
            non_finite.append(key)
        del written  # one tensor in memory at a time
    if non_finite:
        raise ValidationError(
            f"refusing to save {len(non_finite)} tensors holding NaN or inf "
            f"({_names(non_finite)}): no command reads them back; fix or reset them first")
    if view is not None:
        copied |= {key for key, info in view.infos().items()
                   if key not in state and info.dtype == targets[key]}
    return copied, trained


def _recorded_dtypes(config: FusedConfig, targets: Mapping[str, torch.dtype],
                     dtype: torch.dtype | None, fusion_dtype: torch.dtype) -> dict:
    """``dtypes`` and the sources' ``tensor_dtypes`` as written, for ``FusedConfig.replace``."""
    def name(d: torch.dtype) -> str:
        return str(d).removeprefix("torch.")

    written: dict[str, set[str]] = {}
    for key, target in targets.items():
        origin = native_key_of(key)
        if origin is not None:
            written.setdefault(origin[0], set()).add(name(target))
    dtypes = dict(config.dtypes)
    dtypes["fusion"] = name(fusion_dtype)
    if dtype is not None:
        dtypes.update({part: name(dtype) for part in written})
    sources = {part: ({**record, "tensor_dtypes": sorted(written[part])}
                      if part in written and "tensor_dtypes" in record else record)
               for part, record in config.sources.items()}
    return {"dtypes": dtypes, "sources": sources}


__all__ = ["gate_values", "save_fused"]
