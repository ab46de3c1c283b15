"""``save_fused``: write a (trained) ``DeepFusionModel`` back in the fused layout, streaming
and atomically, with an updated ``fusion_config.json``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fusesurgery import _json as standard_json
from fusesurgery.errors import ConfigError, FuseSurgeryError
from fusesurgery.io import TensorInfo, open_checkpoint
from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
from fusesurgery.modules import DeepFusionModel, TanhGate
from fusesurgery.surgery.fused_config import SOURCE_FILES_DIR, FusedConfig
from fusesurgery.write.fuse_checkpoint import readme_text
from fusesurgery.write.safetensors_writer import WriteResult, write_safetensors
from fusesurgery.write.shard_plan import DEFAULT_MAX_SHARD_SIZE
from fusesurgery.write.side_files import DECODER_SIDE_FILES, ENCODER_SIDE_FILES, read_side_files


def gate_values(model: DeepFusionModel) -> dict[str, float]:
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


def _stored_order(source_dir: Path | None, state: dict) -> tuple[list[str], set[str]]:
    """The keys in the order (and with the shard boundaries) of the checkpoint the model was
    loaded from, so a saved model is laid out as ``fuse`` wrote it; else the state dict's."""
    if source_dir is None or not source_dir.is_dir():
        return list(state), set()
    try:
        with open_checkpoint(source_dir) as source:
            infos = source.infos()
    except FuseSurgeryError:
        return list(state), set()
    if set(infos) != set(state):
        return list(state), set()
    first_of_file: dict[object, str] = {}
    for key, info in infos.items():
        first_of_file.setdefault(info.file, key)
    return list(infos), set(first_of_file.values())


def save_fused(
    model: DeepFusionModel,
    out_dir: str | os.PathLike[str],
    *,
    config: FusedConfig | None = None,
    like: str | os.PathLike[str] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    durable: bool = True,
) -> WriteResult:
    """Write ``model`` as a fused checkpoint: the same keys as ``fuse`` writes, tensor by tensor.

    Args:
        model: a ``DeepFusionModel`` (usually from ``load_fused``, then trained).
        out_dir: the output directory, written atomically. It may not be the directory the
            model was loaded from (its tensors are mapped from those files).
        config: the model's fusion config; default ``model.fused_config``.
        like: a fused checkpoint whose tokenizer, processor and source files are carried
            over; default ``model.fused_path``.
        max_shard_size: largest shard.
        overwrite: replace an earlier fusesurgery output at ``out_dir``.
        durable: fsync before the output appears.

    Returns:
        The files written. ``fusion_config.json`` records the gate values, and ``trained``
        when any gate is nonzero (the model no longer computes what the decoder computed).

    Raises:
        ConfigError: no config given and the model has none.
        WriteError: the output cannot be written, or overlaps the checkpoint the model reads.
    """
    config = config if config is not None else getattr(model, "fused_config", None)
    if config is None:
        raise ConfigError("the model carries no fusion config (it was not loaded with "
                          "load_fused); pass config=")
    source_dir = Path(like) if like is not None else getattr(model, "fused_path", None)
    gates = gate_values(model)
    trained = any(value != 0.0 for value in gates.values())
    state = model.state_dict()
    dtypes = dict(config.dtypes)
    config = config.replace(trained=trained, gates=gates, dtypes=dtypes)
    extra = _carried_files(source_dir)
    extra[FUSION_CONFIG_FILE] = standard_json.dumps(config.to_dict(), indent=2) + "\n"
    sources = {part: str(record.get("path", "?")) for part, record in config.sources.items()}
    extra["README.md"] = readme_text(config, {"decoder": sources.get("decoder", "?"),
                                              "encoder": sources.get("encoder", "?")})
    order, new_shard_at = _stored_order(source_dir, state)
    infos = [TensorInfo(key, tuple(state[key].shape), state[key].dtype) for key in order]

    def produce(key: str) -> torch.Tensor:
        return state[key].detach()

    inputs = [source_dir] if source_dir is not None else []
    return write_safetensors(out_dir, infos, produce, max_shard_size=max_shard_size,
                             new_shard_at=new_shard_at,
                             extra_files=extra, overwrite=overwrite, durable=durable,
                             inputs=inputs)


__all__ = ["gate_values", "save_fused"]
