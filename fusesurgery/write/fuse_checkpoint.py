"""``fuse``: a pretrained vision tower and a pretrained decoder into one fused checkpoint,
streamed from the inputs to the output one tensor at a time.

Original tensors keep their bytes (kernel copies, or row gathers for the RoPE q/k
permutation); the new ones (fusion layers, new embedding rows, projection head) are created
and written one at a time. Peak memory is about the largest new tensor, whatever the model.

The work is mostly copying, and copying needs neither torch nor the plans: the source files
that become output shards under new names start copying on a thread (``CopyAhead``) as soon
as the inputs are recognised, before torch is imported; the shards that are copies of parts
of files are written on a thread of the writer while the new tensors are drawn and written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusesurgery import _json as standard_json
from fusesurgery._lazy import first_torch_import
from fusesurgery._version import __version__
from fusesurgery.convert.detect import DetectedModel, detect_layout, detect_model
from fusesurgery.convert.keymaps import keys_to_native
from fusesurgery.convert.tied_output import (
    TIED_OUTPUT_FIELD,
    hf_output_key,
    recorded_output_copy,
    resolve_stored_output,
    with_equal_reason,
)
from fusesurgery.convert.tokenizer import TOKENIZER_FILES, add_special_tokens
from fusesurgery.errors import ConfigError, FuseSurgeryError
from fusesurgery.io import CheckpointSource, TensorInfo, open_checkpoint
from fusesurgery.io._files import file_fingerprint, read_side_file
from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
from fusesurgery.surgery.fuse_plan import (
    FuseOptions,
    FusePlan,
    check_fuse_inputs,
    fused_key_of,
    plan_fuse,
)
from fusesurgery.surgery.fused_config import SOURCE_FILES_DIR, FusedConfig
from fusesurgery.write.copy_ahead import CopyAhead
from fusesurgery.write.output_guard import check_destination, check_not_an_input, resolve_output
from fusesurgery.write.safetensors_writer import WriteResult, whole_file_source, write_safetensors
from fusesurgery.write.shard_plan import DEFAULT_MAX_SHARD_SIZE, parse_size
from fusesurgery.write.side_files import (
    DECODER_SIDE_FILES,
    ENCODER_SIDE_FILES,
    HF_CONFIG_SIDE_FILE,
    read_side_files,
    side_directory,
)

if TYPE_CHECKING:  # torch loads while the first files are copied (see the module docstring)
    import torch


@dataclass(frozen=True)
class FuseResult:
    """Attributes:
        plan: what was fused.
        decoder: what the decoder source was.
        encoder: what the encoder source was.
        written: the files written.
        tokenizer_files: the tokenizer files written with the new tokens.
    """

    plan: FusePlan
    decoder: DetectedModel
    encoder: DetectedModel
    written: WriteResult
    tokenizer_files: tuple[str, ...]

    @property
    def config(self) -> FusedConfig:
        return self.plan.config


def _source_record(source: CheckpointSource, detected: DetectedModel, plan, kept: list[str],
                   given: str) -> dict[str, Any]:
    hub = {"hub": source.hub.record()} if source.hub is not None else {}  # a Hub repo id
    return {
        "path": given,
        **hub,
        "format": source.format,
        "layout": detected.layout,
        "family": detected.family,
        "kind": detected.kind,
        "config_file": source.config_file,
        "total_bytes": source.total_bytes,
        "files": [file_fingerprint(Path(file)) for file in source.files],
        "kept_files": kept,
        "tensor_dtypes": sorted({str(e.dtype).removeprefix("torch.") for e in plan.entries}),
        "dropped": dict(plan.dropped),
        "source_keys": {entry.target_key: entry.source_key for entry in plan.entries},
    }


def files_kept_whole(part: str, source: CheckpointSource, detected: DetectedModel,
                     options: FuseOptions, max_shard_size: int | str) -> list[Path]:
    """The source files that will be output shards with only their names (and perhaps the
    order of q/k rows) changed, from their headers and the key maps alone, before anything
    is planned or torch imported: every tensor kept, none cast (a ``--dtype`` that is the
    file's own leaves it as it is), the fused names' header fits in the file's, the file fits
    one shard (see ``whole_file_source``).

    Args:
        part: ``"decoder"`` or ``"encoder"``.
        source: the opened source.
        detected: what it was recognised as.
        options: the fuse options (a cast changes every byte).
        max_shard_size: the output's largest shard.

    Returns:
        The files, in the order the writer will reach them; a guess that the plan confirms or
        not (an unconfirmed copy is only wasted work, see ``CopyAhead``).
    """
    cast = None if options.dtype is None else TensorInfo("", (), options.dtype).dtype_code
    try:
        limit = parse_size(max_shard_size)
        infos = source.infos()
        mapping = keys_to_native(infos, detected.layout, detected.kind)
        regions = {key: source.file_region(key) for key in infos}
    except FuseSurgeryError:
        return []
    if any(region is None for region in regions.values()):  # a pickle: never copied whole
        return []
    excluded = {region.path for key, region in regions.items() if key not in mapping.mapping}
    tied = getattr(detected.config, "tie_word_embeddings", False)
    by_file: dict[Path, list[str]] = {}
    for key, native in mapping.mapping.items():
        if tied and native == "output.weight":  # dropped by the plan
            excluded.add(regions[key].path)
        by_file.setdefault(regions[key].path, []).append(key)
    kept = []
    for path in sorted(by_file, key=str):
        keys = sorted(by_file[path], key=lambda key: regions[key].offset)
        if path in excluded or sum(infos[key].nbytes for key in keys) > limit:
            continue
        if cast is not None and any(infos[key].is_floating_point
                                    and infos[key].dtype_code != cast for key in keys):
            continue
        fused = [TensorInfo(fused_key_of(part, mapping.mapping[key]), tuple(infos[key].shape),
                            infos[key].dtype_code) for key in keys]
        if whole_file_source(fused, [regions[key] for key in keys]) == path:
            kept.append(path)
    return kept


def _room_for(out: Path, needed: int) -> bool:
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    try:
        return shutil.disk_usage(existing).free >= needed
    except OSError:
        return False


class _TwoAtOnce:
    """Makes new tensors on two worker threads (torch releases the GIL in its kernels, and
    each tensor has its own generator, so their values do not depend on which thread draws
    them, or when): asked for tensor ``i``, it draws ``i`` and ``i + 1`` at once. The caller
    writes ``i`` and lets it go before asking for ``i + 1``, so memory holds at most two new
    tensors: the one written and the next, or the next two.

    Args:
        order: the names, in the order they will be asked for.
        makers: name -> a function that makes the tensor.
    """

    def __init__(self, order: list[str], makers: Mapping[str, Callable[[], Any]]) -> None:
        self._order, self._makers = order, makers
        self._position = {name: i for i, name in enumerate(order)}
        self._futures: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fusesurgery-new")

    def _submit(self, index: int) -> None:
        if index < len(self._order) and self._order[index] not in self._futures:
            name = self._order[index]
            self._futures[name] = self._pool.submit(self._makers[name])

    def get(self, name: str) -> Any:
        index = self._position[name]
        self._submit(index)
        self._submit(index + 1)
        return self._futures.pop(name).result()

    def __enter__(self) -> _TwoAtOnce:
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self._futures.values():
            future.cancel()
        self._pool.shutdown(wait=True)


def readme_text(config: FusedConfig, sources: Mapping[str, str]) -> str:
    """The short README.md of a fused checkpoint."""
    d, e, f = config.decoder, config.encoder, config.fusion
    tokens = ", ".join(f"`{t.token}` = {t.id}" for t in config.new_tokens) or "none"
    tied = ("The embeddings are tied: the output projection is the original table, so the new "
            "tokens are input-only (never predicted)." if d.tie_word_embeddings else
            "The output projection is the original one: the new tokens are input-only (never "
            "predicted).")
    layer = "final hidden states" if e.output_layer is None else f"hidden_states[{e.output_layer}]"
    changed = " and ".join(
        ([f"{len(config.trained_originals)} of its original tensors differ from the sources'"]
         if config.trained_originals else [])
        + (["its gates are nonzero"] if any(config.gates.values()) else [])) or "it changed"
    identity = (
        f"This checkpoint was saved after training: {changed}, so it no longer "
        "computes what the original decoder computed." if config.trained else
        "Every gate starts at exactly zero, so until it is trained this model computes exactly "
        "what the original decoder computed (`fusesurgery validate` proves it).")
    return f"""# Fused vision-language checkpoint (fusesurgery)

A {e.family} vision tower fused into a {d.family} decoder, Flamingo / Llama 3.2 Vision style,
by fusesurgery {config.version}.

- decoder: `{sources['decoder']}` ({d.num_layers} layers, width {d.embed_dim}, vocab {d.vocab_size})
- encoder: `{sources['encoder']}` ({e.num_layers} layers, width {e.embed_dim}); the fusion reads
  its {layer}, through a `{config.projection}` projection head to width {d.embed_dim}
- gated cross-attention fusion layers at decoder layers {list(f.fusion_layers)}
  ({'before' if f.fusion_first else 'after'} the original layer)
- new tokens: {tokens}
- dtypes: {', '.join(f'{k} {v}' for k, v in config.dtypes.items())}

{tied}

{identity} Keys follow torchtune's fused
layout (`decoder.*` with the original keys, `decoder.layers.N.fusion_layer.*`,
`decoder.tok_embeddings.fusion_embedding.weight`, `encoder.vision.*`, `encoder.projection.*`).

```python
import fusesurgery
model = fusesurgery.load_fused("this-directory")    # a DeepFusionModel
```

`fusesurgery unfuse this-directory -o decoder/` gives the original decoder back, bit for bit.
`{FUSION_CONFIG_FILE}` holds everything needed to rebuild it; `{SOURCE_FILES_DIR}/` keeps the
sources' own config and tokenizer files unchanged.
"""


def fuse_checkpoints(
    encoder_path: str | os.PathLike[str],
    decoder_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    options: FuseOptions | None = None,
    decoder_overrides: Mapping[str, Any] | None = None,
    encoder_overrides: Mapping[str, Any] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    durable: bool = True,
) -> FuseResult:
    """Fuse a vision tower into a decoder and write the fused checkpoint.

    Args:
        encoder_path: a CLIP or SigLIP vision tower (or a CLIPModel / SiglipModel), any form
            ``open_checkpoint`` reads.
        decoder_path: a decoder of any family in ``fusesurgery.families``, any form
            ``open_checkpoint`` reads.
        out_dir: the output directory, written atomically; it may not be, contain, lie inside
            or link to an input.
        options: where and how to fuse.
        decoder_overrides: ``DecoderConfig`` fields the decoder's config lacks or gets wrong.
        encoder_overrides: ``VisionEncoderConfig`` fields likewise.
        max_shard_size: largest shard.
        overwrite: replace an earlier fusesurgery output at ``out_dir``.
        on_progress: called with ``(bytes written, total bytes)`` after each tensor.
        durable: fsync before the output appears.

    Returns:
        The plan, what the sources were, and the files written.

    Raises:
        FuseSurgeryError: unreadable or unrecognised inputs, swapped inputs, bad options
            (layers out of range, a new token the tokenizer already has), or an output that
            cannot be written. Nothing is left at ``out_dir`` on any failure.
    """
    options = options or FuseOptions()
    with ExitStack() as stack:
        encoder = stack.enter_context(open_checkpoint(encoder_path))
        decoder = stack.enter_context(open_checkpoint(decoder_path))
        inputs = (*decoder.paths_read, *encoder.paths_read)
        # refuse a bad destination before any work
        out = resolve_output(out_dir)
        check_not_an_input(out, inputs)
        check_destination(out, overwrite)
        # swapped or wrong inputs, from key names alone: before configs are resolved, whose
        # errors would be about the wrong model
        # (the ENCODER is asked for a tower: a multimodal checkpoint gives its own, Gemma 3's)
        check_fuse_inputs(detect_layout(decoder.infos())[0],
                          detect_layout(encoder.infos(), want="vision")[0])

        dec = detect_model(decoder.infos(), decoder.config, decoder.config_file,
                           decoder_overrides)
        # a tied decoder that stores its head too: compared with the table (torch is loaded
        # for that, in that case only)
        dec, stored_head = resolve_stored_output(decoder, dec)
        enc = detect_model(encoder.infos(), encoder.config, encoder.config_file,
                           encoder_overrides, want="vision")
        # the copying starts here, while torch loads
        whole = [*files_kept_whole("decoder", decoder, dec, options, max_shard_size),
                 *files_kept_whole("encoder", encoder, enc, options, max_shard_size)]
        # never at the cost of the output's own space (the writer checks that it fits)
        if whole and not _room_for(out, sum(os.path.getsize(file) for file in whole)
                                   + decoder.total_bytes + encoder.total_bytes):
            whole = []
        precopied = stack.enter_context(CopyAhead(out, whole))

        with first_torch_import():
            from fusesurgery.convert import plan_conversion  # noqa: PLC0415 - imports torch
            from fusesurgery.surgery.new_params import (  # noqa: PLC0415
                embedding_stats,
                make_new_tensor,
            )
            from fusesurgery.write.plan_sources import (  # noqa: PLC0415
                plan_entry_source,
                source_file_order,
            )

        dec_plan = plan_conversion(decoder.infos(), dec.layout, dec.config, kind=dec.kind,
                                   dtype=options.dtype)
        # a tied decoder's stored head, equal to the table, comes back with unfuse
        dec_plan = with_equal_reason(dec_plan, stored_head)
        tied = dec.kind == "decoder" and dec.config.tie_word_embeddings
        head_copy = None if stored_head is None else hf_output_key()
        if head_copy is None and dec.layout == "native" and decoder.config is not None:
            head_copy = recorded_output_copy(decoder.config, tied, str(decoder.config_file))
        enc_plan = plan_conversion(encoder.infos(), enc.layout, enc.config, kind=enc.kind,
                                   dtype=options.dtype)
        plan = plan_fuse(dec, dec_plan, enc, enc_plan, options, version=__version__)

        # side files: the sources' own (kept unchanged under source/) and the ones OUT uses
        extra: dict[str, bytes] = {}
        records = {}
        tokenizer_written: tuple[str, ...] = ()
        for part, source, detected, part_plan, names, given in (
            ("decoder", decoder, dec, dec_plan, DECODER_SIDE_FILES, decoder_path),
            ("encoder", encoder, enc, enc_plan, ENCODER_SIDE_FILES, encoder_path),
        ):
            directory = side_directory(source)
            files = read_side_files(directory, names)
            kept = dict(files)
            if source.config_file:
                kept[source.config_file] = read_side_file(directory / source.config_file)
            if part == "decoder":  # its transformers config, kept beside a native or Meta one
                kept.update(read_side_files(directory, (HF_CONFIG_SIDE_FILE,)))
            for name, content in kept.items():
                extra[f"{SOURCE_FILES_DIR}/{part}/{name}"] = content
            if part == "decoder":
                tokenizer = {n: c for n, c in files.items() if n in TOKENIZER_FILES}
                if tokenizer and plan.config.new_tokens:
                    first_id = plan.config.new_tokens[0].id
                    tokenizer = add_special_tokens(
                        tokenizer, [t.token for t in plan.config.new_tokens], first_id)
                    tokenizer_written = tuple(sorted(tokenizer))
                files = {**files, **tokenizer}
            extra.update(files)
            records[part] = _source_record(source, detected, part_plan, sorted(kept),
                                           str(given))
            if part == "decoder" and head_copy is not None:
                records[part][TIED_OUTPUT_FIELD] = head_copy
        config = plan.config.replace(sources=records)
        extra[FUSION_CONFIG_FILE] = standard_json.dumps(config.to_dict(), indent=2) + "\n"
        extra["README.md"] = readme_text(config, {"decoder": str(decoder_path),
                                                  "encoder": str(encoder_path)})

        # the tensors: each source in its files' order (whole files copied where they can
        # be), then the new ones
        ordered: list[TensorInfo] = []
        new_shard_at: set[str] = set()
        producers: dict[str, Callable[[], Any]] = {}
        for part, source, part_plan in (("decoder", decoder, dec_plan),
                                        ("encoder", encoder, enc_plan)):
            infos, starts = source_file_order(part_plan, source)
            entries = {entry.target_key: entry for entry in part_plan.entries}
            for info in infos:
                key = fused_key_of(part, info.name)
                ordered.append(TensorInfo(key, info.shape, info.dtype))
                if info.name in starts or info is infos[0]:
                    new_shard_at.add(key)
                producers[key] = (lambda e=entries[info.name], s=source:
                                  plan_entry_source(e, s))

        stats_cache: list = []
        stats_lock = threading.Lock()

        def stats():
            with stats_lock:  # once, whichever drawing thread asks first
                if stats_cache:
                    return stats_cache[0]
                entry = dec_plan.entry("tok_embeddings.weight")
                stats_cache.append(embedding_stats(
                    decoder.get_tensor(entry.source_key),
                    with_std=options.embedding_init == "normal"))
            return stats_cache[0]

        ahead = stack.enter_context(_TwoAtOnce(
            [spec.name for spec in plan.new_tensors],
            {spec.name: (lambda s=spec: make_new_tensor(s, options.seed, stats))
             for spec in plan.new_tensors}))
        for index, spec in enumerate(plan.new_tensors):
            ordered.append(spec.info)
            if index == 0:
                new_shard_at.add(spec.name)
            producers[spec.name] = (lambda name=spec.name: ahead.get(name))

        written = write_safetensors(
            out,
            ordered,
            lambda key: producers[key](),
            new_shard_at=new_shard_at,
            max_shard_size=max_shard_size,
            extra_files=extra,
            overwrite=overwrite,
            on_progress=on_progress,
            durable=durable,
            inputs=inputs,
            precopied=precopied,
        )
    return FuseResult(plan=dataclasses.replace(plan, config=config),
                      decoder=dec, encoder=enc, written=written,
                      tokenizer_files=tokenizer_written)


def fuse(
    encoder: str | os.PathLike[str],
    decoder: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    every: int = 4,
    layers: list[int] | None = None,
    fusion_after: bool = False,
    new_tokens: tuple[str, ...] | list[str] = ("<|image|>",),
    embedding_init: str = "mean",
    encoder_layer: Any = "default",
    encoder_tokens: str = "default",
    projection: str = "mlp",
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> FuseResult:
    """``fusesurgery fuse ENCODER DECODER -o OUT`` as a function (see ``fuse_checkpoints``
    for the remaining keyword arguments: overrides, ``max_shard_size``, ``overwrite``).

    Args:
        encoder: the vision tower checkpoint.
        decoder: the decoder checkpoint.
        out_dir: the output directory.
        every: a fusion layer in every ``every``-th decoder layer (ignored with ``layers``).
        layers: explicit decoder layer indices for the fusion layers.
        fusion_after: run each fusion layer after its original layer instead of before.
        new_tokens: tokens to add (ids ``vocab_size + i``).
        embedding_init: ``mean``, ``zeros`` or ``normal``.
        encoder_layer: the encoder hidden layer that feeds the fusion; ``"default"`` for the
            family's default, None for the final hidden states.
        encoder_tokens: which encoder output tokens feed the fusion (``all``,
            ``cls_and_patches``, ``patches``); ``"default"`` for the family's default.
        projection: ``linear`` or ``mlp``.
        dtype: cast everything (a torch dtype or a name such as ``"bf16"``); None keeps each
            input's dtype.
        seed: seed of the new parameters.

    Returns:
        See ``fuse_checkpoints``.

    Raises:
        FuseSurgeryError: see ``fuse_checkpoints``.
    """
    options = fuse_options(every=every, layers=layers, fusion_after=fusion_after,
                           new_tokens=new_tokens, embedding_init=embedding_init,
                           encoder_layer=encoder_layer, encoder_tokens=encoder_tokens,
                           projection=projection, dtype=dtype, seed=seed)
    return fuse_checkpoints(encoder, decoder, out_dir, options=options, **kwargs)


def fuse_options(*, every: int = 4, layers: list[int] | None = None, fusion_after: bool = False,
                 new_tokens: tuple[str, ...] | list[str] = ("<|image|>",),
                 embedding_init: str = "mean", encoder_layer: Any = "default",
                 encoder_tokens: str = "default", projection: str = "mlp",
                 dtype: torch.dtype | str | None = None, seed: int = 0) -> FuseOptions:
    """``fuse``'s keyword arguments as FuseOptions (see ``fuse``).

    Raises:
        ConfigError: an unknown dtype name, or an argument of the wrong type.
    """
    from fusesurgery.io.tensor_info import dtype_from_name  # noqa: PLC0415
    from fusesurgery.surgery.fuse_plan import DEFAULT  # noqa: PLC0415

    if isinstance(dtype, str):
        try:
            dtype = dtype_from_name(dtype)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return FuseOptions(
        fusion_layers=layers,
        every=every,
        fusion_first=not fusion_after,
        new_tokens=new_tokens,
        embedding_init=embedding_init,
        encoder_layer=DEFAULT if encoder_layer == "default" else encoder_layer,
        encoder_tokens=DEFAULT if encoder_tokens == "default" else encoder_tokens,
        projection=projection,
        dtype=dtype,
        seed=seed,
    )


__all__ = ["FuseResult", "fuse", "fuse_checkpoints", "fuse_options", "readme_text"]
