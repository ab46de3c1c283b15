"""Fused checkpoints as models: rebuild the ``DeepFusionModel`` a ``fusion_config.json``
describes and load its tensors into it, mmap-backed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch

from fusesurgery._device import check_device
from fusesurgery.convert import apply_plan_entry, detect_model, plan_conversion
from fusesurgery.convert.detect import detect_layout
from fusesurgery.convert.keymaps import keys_to_native
from fusesurgery.convert.plan import ConversionPlan, PlanEntry, check_cast_dtype
from fusesurgery.convert.tokenizer import check_new_tokens_present, read_tokenizer_files
from fusesurgery.convert.transforms import IDENTITY
from fusesurgery.errors import ConfigError, ShapeError
from fusesurgery.io import CheckpointSource, FileRegion, TensorInfo, open_checkpoint
from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
from fusesurgery.modules import (
    DeepFusionModel,
    TransformerDecoder,
    build_decoder,
    build_deep_fusion_model,
    fuse_decoder,
    get_fusion_params,
    init_non_persistent_buffers,
    set_trainable_params,
)
from fusesurgery.surgery.fused_config import (
    GATE_SUFFIXES,
    FusedConfig,
    NewToken,
    check_config_against_keys,
    check_gates_against_weights,
    fused_config_from_dict,
)


class FusedView:
    """A fused checkpoint's tensors under their native fused names, whatever the layout they
    are stored in (fusesurgery's own: as stored; Mllama's: renamed, its q/k rows permuted, its
    one embedding table split in two). The subset of ``CheckpointSource`` readers use.

    Args:
        source: the open checkpoint.
        plan: its conversion to the native fused layout.
    """

    def __init__(self, source: CheckpointSource, plan: ConversionPlan) -> None:
        self.source = source
        self.path = source.path
        self.paths_read = source.paths_read
        self.layout = plan.source_layout
        self._entries = {entry.target_key: entry for entry in plan.entries}
        self._infos = plan.target_infos()
        # reads the tokenizer, processor and generation files a native checkpoint written
        # from this view carries, where they are not the directory's own (a transformers
        # export's processor_config.json names a class only the export has); None: its own
        self.side_files: Callable[[], dict[str, bytes | str]] | None = None

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def keys(self) -> list[str]:
        return list(self._infos)

    def entry(self, key: str) -> PlanEntry:
        return self._entries[key]

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        return apply_plan_entry(entry, self.source.get_tensor(entry.source_key))

    def read_tensor(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        return apply_plan_entry(entry, self.source.read_tensor(entry.source_key))

    def file_region(self, key: str) -> FileRegion | None:
        entry = self._entries[key]
        if entry.transform != (IDENTITY,) or entry.dtype != entry.source_dtype:
            return None
        return self.source.file_region(entry.source_key)


# Mllama's embedding has 8 rows past the vocabulary, its tokenizer a token for the first
# alone (<|image|>); the other rows get these names, which no tokenizer need hold.
MLLAMA_ROW_TOKEN = "<|mllama_fusion_token_{i}|>"


def _mllama_config(source: CheckpointSource, path: object) -> FusedConfig:
    """What an Mllama checkpoint holds, as a fusion config: its text model as the decoder,
    its vision side opaque, its 8 fusion rows as new tokens (``<|image|>`` first)."""
    detected = detect_model(source.infos(), source.config, source.config_file)
    vocab = detected.config.vocab_size
    tokens = [NewToken("<|image|>" if i == 0 else MLLAMA_ROW_TOKEN.format(i=i), vocab + i)
              for i in range(detected.fusion.fusion_vocab_size)]
    has_vision = any(not k.startswith(("decoder.",)) for k in
                     keys_to_native(source.infos(), "mllama", "fused").mapping.values())
    dtype = str(next(iter(source.infos().values())).dtype).removeprefix("torch.")
    return FusedConfig(
        decoder=detected.config, encoder=None, fusion=detected.fusion, projection=None,
        new_tokens=tuple(tokens), dtypes={"decoder": dtype, "fusion": dtype},
        sources={"decoder": {"path": str(path), "layout": "hf", "format": source.format,
                             "family": "llama", "kind": "decoder", "config_file": None,
                             "opaque_encoder": "mllama" if has_vision else None}},
        version="")


@contextmanager
def open_fused(path: str | os.PathLike[str]) -> Iterator[tuple[FusedView, FusedConfig]]:
    """Open a fused checkpoint: fusesurgery's own (with its ``fusion_config.json``) or a
    transformers Mllama one. Yields a view of its tensors under native fused names, and its
    config.

    Raises:
        FuseSurgeryError: unreadable, neither a fusesurgery fused checkpoint nor an Mllama
            one, or a damaged ``fusion_config.json``.
    """
    with open_checkpoint(path) as source:
        kind, layout = detect_layout(source.infos())
        if kind == "fused" and layout == "mllama":
            config = _mllama_config(source, path)
        elif source.config_file != FUSION_CONFIG_FILE or source.config is None:
            raise ConfigError(
                f"{path} is not a fused checkpoint written by fusesurgery: it has no "
                f"{FUSION_CONFIG_FILE} beside its weights (found "
                f"{source.config_file or 'no config'})")
        else:
            directory = Path(source.path) if Path(source.path).is_dir() else Path(
                source.path).parent
            origin = str(directory / FUSION_CONFIG_FILE)
            config = fused_config_from_dict(source.config, origin)
            # before anything of the sizes it states is planned or built; then the gates
            # and the tokenizer against what it records
            check_config_against_keys(config, source.infos(), origin)
        plan = plan_conversion(source.infos(), layout, config.decoder, kind="fused")
        view = FusedView(source, plan)
        gates = gate_scalars(view)
        if layout == "mllama":  # its config is read off its weights: record their gates
            config = config.replace(gates=gates, trained=any(v != 0.0 for v in gates.values()))
        else:
            check_gates_against_weights(config, gates, origin)
            check_tokenizer(directory, config, origin)
        yield view, config


# (digest of the tokenizer files, the new tokens) already found consistent in this process:
# validate opens a fused checkpoint several times, and a 128k-token tokenizer.json takes
# most of a second to check, a few milliseconds to hash.
_TOKENIZERS_CHECKED: set[tuple[str, tuple[NewToken, ...]]] = set()


def check_tokenizer(directory: Path, config: FusedConfig, origin: str) -> None:
    """The new tokens against the tokenizer beside the weights (see
    :func:`check_new_tokens_present`).

    Raises:
        ConfigError: a token missing, at another id, or an id taken.
    """
    files = read_tokenizer_files(directory)
    digest = hashlib.sha256()
    for name, content in sorted(files.items()):
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    key = (digest.hexdigest(), config.new_tokens)
    if key in _TOKENIZERS_CHECKED:
        return
    check_new_tokens_present(
        files, [(token.token, token.id) for token in config.new_tokens], origin,
        optional=[MLLAMA_ROW_TOKEN.format(i=i) for i in range(len(config.new_tokens))])
    _TOKENIZERS_CHECKED.add(key)


def gate_scalars(view: FusedView) -> dict[str, float]:
    """Every tanh gate's value, read from its one-element tensor (no other tensor is read).

    Raises:
        ShapeError: a gate that is not one element.
    """
    gates = {}
    for key, info in sorted(view.infos().items()):
        if key.endswith(GATE_SUFFIXES) and ".fusion_layer." in key:
            if info.numel != 1:
                raise ShapeError(f"{view.path}: {key} has shape {list(info.shape)}, not the "
                                 "one element of a tanh gate")
            gates[key] = float(view.get_tensor(key).float().item())
    return gates


def read_fused_config(path: str | os.PathLike[str]) -> FusedConfig:
    """The parsed ``fusion_config.json`` of the fused checkpoint at ``path``.

    Raises:
        FuseSurgeryError: as :func:`open_fused`.
    """
    with open_fused(path) as (_, config):
        return config


def build_fused_model(config: FusedConfig, **trainable: bool) -> DeepFusionModel:
    """The ``DeepFusionModel`` ``config`` describes, on the current default device (build it
    under ``torch.device("meta")`` to allocate nothing), trainable flags as given (defaults:
    only the fusion parameters train)."""
    return build_deep_fusion_model(config.decoder, config.encoder, config.fusion,
                                   projection=config.projection, **trainable)


def _checked_state(view: FusedView, expected: dict, path: object, prefix: str = "") -> dict:
    """The view's tensors for a module whose state dict is ``expected``, keys and shapes
    checked first (the message names what differs, unlike ``load_state_dict``'s)."""
    infos = {k.removeprefix(prefix): v for k, v in view.infos().items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(infos))
    unexpected = sorted(set(infos) - set(expected))
    if missing or unexpected:
        raise ShapeError(
            f"{path}: the checkpoint's keys are not the model's: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}")
    for key, shape in expected.items():
        if tuple(infos[key].shape) != shape:
            raise ShapeError(f"{path}: {prefix}{key} is {list(infos[key].shape)}, the model "
                             f"needs {list(shape)}")
    return {key: view.get_tensor(prefix + key) for key in expected}


# Opens a fused checkpoint of some layout: a view of its tensors under native fused names, and
# its checked config (as :func:`open_fused` does).
FusedOpener = Callable[[str | os.PathLike[str]],
                       AbstractContextManager[tuple[FusedView, FusedConfig]]]


def load_fused_from(
    opener: FusedOpener,
    path: str | os.PathLike[str],
    *,
    part: str = "model",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> DeepFusionModel | TransformerDecoder:
    """:func:`~fusesurgery.surgery.exported.load_fused` of a checkpoint ``opener`` reads
    (:func:`open_fused`, or a transformers export's opener), with every check and rule it has.

    Args:
        opener: ``opener(path)`` is a context manager yielding ``(view, config)``.
        path: what ``opener`` opens.
        part: as :func:`~fusesurgery.surgery.exported.load_fused`.
        device: as :func:`~fusesurgery.surgery.exported.load_fused`.
        dtype: as :func:`~fusesurgery.surgery.exported.load_fused`.
        decoder_trainable: as :func:`~fusesurgery.surgery.exported.load_fused`.
        encoder_trainable: as :func:`~fusesurgery.surgery.exported.load_fused`.
        fusion_trainable: as :func:`~fusesurgery.surgery.exported.load_fused`.

    Returns:
        The model, as :func:`~fusesurgery.surgery.exported.load_fused`.

    Raises:
        FuseSurgeryError: as :func:`~fusesurgery.surgery.exported.load_fused`, or what
            ``opener`` raises.
    """
    check_cast_dtype(dtype)
    check_device(device, "device")
    if not isinstance(part, str) or part not in ("model", "decoder"):
        raise ConfigError(f"unknown part {part!r}; valid: model, decoder")
    for name, flag in (("decoder_trainable", decoder_trainable),
                       ("encoder_trainable", encoder_trainable),
                       ("fusion_trainable", fusion_trainable)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be True or False, not {flag!r}")
    with opener(path) as (view, config):
        if part == "model" and config.encoder is None:
            raise ConfigError(f"{path}: its vision side (Mllama's tiled encoder) has no native "
                              "module; load the fused decoder with part='decoder'")
        with torch.device("meta"):
            if part == "model":
                model = build_fused_model(config, decoder_trainable=decoder_trainable,
                                          encoder_trainable=encoder_trainable,
                                          fusion_trainable=fusion_trainable)
            else:
                model = fuse_decoder(build_decoder(config.decoder), config.decoder,
                                     config.fusion)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = _checked_state(view, expected, path, "" if part == "model" else "decoder.")
        if dtype is not None:
            state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
        source_path = Path(view.path)
        directory = source_path if source_path.is_dir() else source_path.parent
    model.load_state_dict(state, strict=True, assign=True)
    if part == "decoder":
        trainable = set(get_fusion_params(model)) if fusion_trainable else set()
        if decoder_trainable:
            trainable |= {name for name, _ in model.named_parameters()}
            if not fusion_trainable:
                trainable -= set(get_fusion_params(model))
        set_trainable_params(model, trainable)
    init_non_persistent_buffers(model, device)
    model = model.to(device)
    model.fused_config = config
    model.fused_path = directory
    model.fused_opener = opener  # save_fused reopens the checkpoint with the same reader
    return model


__all__ = ["FusedOpener", "FusedView", "build_fused_model", "check_tokenizer", "gate_scalars",
           "load_fused_from", "open_fused", "read_fused_config"]
