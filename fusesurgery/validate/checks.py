"""``validate``: prove a fused checkpoint is what it claims to be.

Each check is a row with a figure, a status, and what it compared: ``bitwise``, bitwise after
a cast (the fused checkpoint holds the source's values cast to another dtype, so its bits are
not the source's), within a tolerance, or not compared at all. The closing verdict is derived
from those rows: "the fused model is the original decoder, bit for bit" only when every
original tensor and the original decoder's own logits were compared bitwise, without a cast,
and matched. A trained fusion is reported as no longer an identity, with the size of the
difference. The model is loaded mmap-backed in its own dtype, so a checkpoint larger than
memory validates; tensors are compared one at a time, and the vision tower runs once, its
output shared by every check that needs an image.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusesurgery._arguments import SEED_LIMIT, check_int
from fusesurgery._device import check_device
from fusesurgery.convert import apply_plan_entry, detect_model, plan_conversion
from fusesurgery.convert.detect import detect_layout
from fusesurgery.convert.tied_output import resolve_stored_output
from fusesurgery.errors import ConfigError
from fusesurgery.io import open_checkpoint
from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
from fusesurgery.modules import (
    DeepFusionModel,
    FusionLayer,
    TanhGate,
    TransformerDecoder,
)
from fusesurgery.surgery.export_layout import (
    is_any_export,
    is_export_directory,
    local_export_path,
)
from fusesurgery.surgery.exported import load_fused, open_any_fused
from fusesurgery.surgery.fuse_plan import fused_key_of, native_key_of
from fusesurgery.surgery.fused import build_fused_model
from fusesurgery.surgery.load import load_decoder
from fusesurgery.write.save_fused import gate_values

PASS, FAIL, INFO = "pass", "fail", "info"
# Tolerances for results computed two ways in floating point (cached vs full decoding, CPU vs
# GPU): these agree closely, never bitwise.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1,
}

# What a row compared (``Check.basis``). Only BITWISE rows can prove "bit for bit".
BITWISE = "bitwise"
TOLERANCE = "within a tolerance"
NOT_COMPARED = "not compared"
# What a row proves (``Check.proves``), for the verdict.
ORIGINAL_TENSORS = "original tensors"  # the checkpoint's original tensors are the source's
ORIGINAL_LOGITS = "original logits"  # its text logits are the original decoder's own
ZERO_GATE_IDENTITY = "zero-gate identity"  # with zero gates it computes its decoder's logits
TRAINED = "trained"  # the gates moved: no longer an identity
# The rows that prove "the fused model is the original decoder, bit for bit", together.
_BIT_FOR_BIT = (ORIGINAL_TENSORS, ORIGINAL_LOGITS, ZERO_GATE_IDENTITY)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cast_basis(source: torch.dtype | None, target: torch.dtype, why: str = "") -> str:
    """The basis of a comparison made after casting to ``target``: equal values, not the
    source's bits (``source`` None: the stored dtypes, whatever they are)."""
    cast = (f"{_dtype_name(source)} -> " if source is not None else "to ") + _dtype_name(target)
    return f"bitwise after a cast {cast}" + (f" ({why})" if why else "")


@dataclass(frozen=True)
class Check:
    """One validation row.

    Args:
        name: what is checked.
        status: ``pass``, ``fail`` or ``info`` (reported, not a failure).
        figure: the measured number or count, as text.
        detail: what it means.
        basis: what was compared: :data:`BITWISE`, a cast (:func:`cast_basis`),
            :data:`TOLERANCE`, :data:`NOT_COMPARED`, or empty for a structural check.
        proves: which part of the verdict the row backs (:data:`ORIGINAL_TENSORS`,
            :data:`ORIGINAL_LOGITS`, :data:`ZERO_GATE_IDENTITY`, :data:`TRAINED`), or empty.
    """

    name: str
    status: str
    figure: str
    detail: str = ""
    basis: str = ""
    proves: str = ""


@dataclass
class ValidationReport:
    """The result of :func:`validate_fused`.

    Args:
        path: the fused checkpoint.
        checks: the rows, in order.
        identity: every gate is zero and the fused logits equal those of its own decoder
            (its tensors without the fusion layers, or the ``--against`` decoder) bit for bit;
            False once the fusion is trained; None when no forward check ran.
        device: where the forward checks ran.
    """

    path: str
    checks: list[Check] = field(default_factory=list)
    identity: bool | None = None
    device: str = "cpu"

    @property
    def ok(self) -> bool:
        return all(check.status != FAIL for check in self.checks)

    @property
    def bit_for_bit(self) -> bool:
        """The fused model is the original decoder, bit for bit: every check passed, and the
        rows that compare every original tensor with the source, the text logits with the
        original decoder's own, and the logits with an image with the decoder's (zero gates)
        were all made bitwise, without a cast."""
        if not self.ok:
            return False
        for claim in _BIT_FOR_BIT:
            rows = [check for check in self.checks if check.proves == claim]
            if not rows or any(check.status != PASS or check.basis != BITWISE
                               for check in rows):
                return False
        return True

    def add(self, name: str, passed: bool | None, figure: object, detail: str = "", *,
            basis: str = "", proves: str = "") -> None:
        status = INFO if passed is None else (PASS if passed else FAIL)
        self.checks.append(Check(name, status, str(figure), detail, basis, proves))

    def verdict(self) -> str:
        """The closing sentence, from the rows: what was proven and how, never more."""
        if not self.ok:
            return "some checks FAILED"
        if self.bit_for_bit:
            return "all checks passed; the fused model is the original decoder, bit for bit"
        parts = []
        by_claim: dict[str, list[Check]] = {}
        for check in self.checks:
            by_claim.setdefault(check.proves, []).append(check)
        for check in by_claim.get(ORIGINAL_TENSORS, []):
            how = ("bit for bit" if check.basis == BITWISE
                   else f"{check.basis}, not the source's bits")
            parts.append(f"{check.name} ({how})")
        for check in by_claim.get(ORIGINAL_LOGITS, []):
            how = "bit for bit" if check.basis == BITWISE else check.basis
            parts.append(f"{check.name} ({how})")
        if by_claim.get(TRAINED):
            parts.append("the fusion is trained, no longer an identity")
        elif self.identity:
            bases = {check.basis for check in by_claim.get(ZERO_GATE_IDENTITY, [])}
            how = "bit for bit" if bases == {BITWISE} else ", ".join(sorted(bases))
            parts.append(f"with zero gates it computes what its own decoder computes without the "
                         f"fusion layers ({how})")
        for check in self.checks:
            if check.basis == NOT_COMPARED:
                why = check.figure.removeprefix(f"{NOT_COMPARED}: ")
                parts.append(f"the decoder was not compared with the original ({why})")
        return "; ".join(["all checks passed", *parts])

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "identity": self.identity,
                "bit_for_bit": self.bit_for_bit, "verdict": self.verdict(),
                "device": self.device,
                "checks": [check.__dict__ for check in self.checks]}

    def summary(self) -> str:
        lines = [f"{c.status.upper():4}  {c.name}: {c.figure}" + (f" ({c.detail})" if c.detail
                                                                    else "")
                 for c in self.checks]
        return "\n".join([*lines, self.verdict()])


def _integer_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as the widest integer type they divide into:
    ``torch.equal`` on int64 runs several times faster than on bytes."""
    flat = tensor.detach().reshape(-1).contiguous().view(torch.uint8)
    for dtype in (torch.int64, torch.int32, torch.int16):
        if flat.numel() % dtype.itemsize == 0:
            try:
                return flat.view(dtype)
            except RuntimeError:  # a storage offset not aligned to the wider type
                continue
    return flat


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device == b.device and a.is_contiguous() and b.is_contiguous() \
            and a.data_ptr() == b.data_ptr():
        return True  # the same memory
    wide_a, wide_b = _integer_view(a), _integer_view(b)
    if wide_a.dtype != wide_b.dtype:
        wide_a, wide_b = wide_a.view(torch.uint8), wide_b.view(torch.uint8)
    return torch.equal(wide_a, wide_b)


def _logits_agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal and finite: NaN logits with the same bits are no agreement."""
    return _bitwise_equal(a, b) and bool(torch.isfinite(a).all())


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max().item()) if a.numel() else 0.0


def _check_layout(report: ValidationReport, path: str) -> None:
    """Check 1: the keys, shapes and dtypes are exactly those of the model the config
    describes."""
    with open_any_fused(path) as (source, config):
        infos = source.infos()
        with torch.device("meta"):
            model = build_fused_model(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(infos))
        unexpected = sorted(set(infos) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(infos)
                          if tuple(infos[k].shape) != expected[k])
        allowed = {part: set(config.sources.get(part, {}).get("tensor_dtypes", []))
                   for part in ("decoder", "encoder")}
        retyped = []
        for key, info in infos.items():
            name = str(info.dtype).removeprefix("torch.")
            origin = native_key_of(key)
            if origin is None:
                ok = name == config.dtypes.get("fusion", name)
            else:
                ok = not allowed[origin[0]] or name in allowed[origin[0]]
            if not ok:
                retyped.append(key)
        # trained_originals must name original tensors the checkpoint holds
        unknown = [k for k in config.trained_originals
                   if k not in infos or native_key_of(k) is None]
        problems = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (
            ("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped),
            ("of an unexpected dtype", retyped),
            ("trained_originals naming no original tensor", unknown)) if v]
        report.add("keys, shapes and dtypes match the rebuilt model", not problems,
                   f"{len(infos)} tensors", "; ".join(problems))


# What a checkpoint without a config cannot say about itself; the fused config knows it.
_UNINFERABLE = {"decoder": ("num_heads", "num_kv_heads", "head_dim", "rope_base",
                            "rope_scaling", "norm_eps", "max_seq_len"),
                "vision": ("num_heads", "norm_eps")}


def _against_overrides(source, config, kind: str) -> dict | None:
    """For an ``--against`` checkpoint without a config: the fused config's values of what
    shapes cannot tell (head counts, RoPE, epsilons)."""
    if source.config is not None or kind not in _UNINFERABLE:
        return None
    part = config.decoder if kind == "decoder" else config.encoder
    return {name: getattr(part, name) for name in _UNINFERABLE[kind]}


@dataclass(frozen=True)
class _Against:
    """What the ``--against`` check found: the part compared and the casts fuse made.

    Args:
        part: ``decoder`` or ``encoder``.
        casts: ``(source dtype, fused dtype)`` of the tensors fuse cast, empty when none was.
    """

    part: str
    casts: frozenset[tuple[torch.dtype, torch.dtype]]


def _tensor_basis(bitwise: int, cast: dict[tuple[torch.dtype, torch.dtype], int]) -> str:
    """:data:`BITWISE` when no tensor was cast, else each cast with its count."""
    if not cast:
        return BITWISE
    casts = [cast_basis(*pair) + (f" ({count})" if bitwise or len(cast) > 1 else "")
             for pair, count in sorted(cast.items(), key=str)]
    return ", ".join(([f"{BITWISE} ({bitwise})"] if bitwise else []) + casts)


def _check_against(report: ValidationReport, path: str, against: str) -> _Against:
    """Check 2: the original tensors are the source's (bit for bit, or after the same cast
    when fuse cast them), and the key set is the source's plus exactly the planned fusion
    keys."""
    with open_any_fused(path) as (fused, config), open_checkpoint(against) as source:
        overrides = _against_overrides(source, config, detect_layout(source.infos())[0])
        detected = detect_model(source.infos(), source.config, source.config_file, overrides)
        detected, _ = resolve_stored_output(source, detected)  # as fuse read it
        if detected.kind not in ("decoder", "vision"):
            raise ConfigError(f"--against {against} holds a {detected.kind} checkpoint; give the "
                              "original decoder (or vision tower)")
        part = "decoder" if detected.kind == "decoder" else "encoder"
        plan = plan_conversion(source.infos(), detected.layout, detected.config,
                               kind=detected.kind)
        fused_infos = fused.infos()
        originals = {native_key_of(k)[1] for k in fused_infos
                     if native_key_of(k) is not None and native_key_of(k)[0] == part}
        planned = set(plan.target_keys)
        with torch.device("meta"):
            model = build_fused_model(config)
        new_expected = {k for k in model.state_dict() if native_key_of(k) is None}
        new_found = {k for k in fused_infos if native_key_of(k) is None}
        key_problems = []
        if originals != planned:
            key_problems.append(f"{len(planned - originals)} source keys missing, "
                                f"{len(originals - planned)} extra")
        if new_found != new_expected:
            key_problems.append(f"{len(new_found ^ new_expected)} fusion keys differ from plan")
        report.add(f"{part} keys are the original's plus the planned fusion keys",
                   not key_problems,
                   f"{len(planned)} original + {len(new_expected)} new",
                   "; ".join(key_problems))
        differing = []
        bitwise, cast = 0, {}
        for entry in plan.entries:
            key = fused_key_of(part, entry.target_key)
            if key not in fused_infos:
                continue
            theirs = fused.get_tensor(key)
            if theirs.dtype != entry.dtype:  # fused with a cast: compare with the same cast
                pair = (entry.source_dtype, theirs.dtype)
                cast[pair] = cast.get(pair, 0) + 1
                entry = type(entry)(**{**entry.__dict__, "dtype": theirs.dtype})
            else:
                bitwise += 1
            ours = apply_plan_entry(entry, source.get_tensor(entry.source_key))
            if not _bitwise_equal(ours, theirs):
                differing.append(key)
        compared = bitwise + sum(cast.values())
        basis = _tensor_basis(bitwise, cast)
        figure = f"{compared - len(differing)}/{compared} equal"
        figure += f" {BITWISE}" if basis == BITWISE else f": {basis}"
        if differing:
            detail = f"first differing: {differing[0]}"
        else:
            detail = "fuse cast them: not the source's bits" if cast else ""
        report.add(f"original {part} tensors equal {against}'s", not differing, figure, detail,
                   basis=basis, proves=ORIGINAL_TENSORS)
    return _Against(part, frozenset(cast))


def _plain_decoder(model: DeepFusionModel, with_new_tokens: bool) -> TransformerDecoder:
    """The fused model's decoder without its fusion layers, sharing its tensors: what the
    original decoder computes (with the new tokens' rows when ``with_new_tokens``)."""
    decoder = model.decoder
    embedding = decoder.tok_embeddings
    if not with_new_tokens and hasattr(embedding, "embedding"):
        embedding = embedding.embedding
    return TransformerDecoder(
        tok_embeddings=embedding,
        layers=[layer.layer if isinstance(layer, FusionLayer) else layer
                for layer in decoder.layers],
        norm=decoder.norm,
        output=decoder.output,
        max_seq_len=decoder.max_seq_len,
        embed_scale=decoder.embed_scale,
        final_softcap=decoder.final_softcap,
    )


@contextlib.contextmanager
def _gate_inputs_finite(model: DeepFusionModel) -> Iterator[list[bool]]:
    """Records whether every input of every gate (the fusion branch's output) is finite."""
    finite: list[bool] = []
    hooks = [module.register_forward_hook(
        lambda _m, args, _out: finite.append(bool(torch.isfinite(args[0]).all())))
        for module in model.modules() if isinstance(module, TanhGate)]
    try:
        yield finite
    finally:
        for hook in hooks:
            hook.remove()


def _inputs(model: DeepFusionModel, seed: int, batch: int, seq_len: int, device: torch.device):
    config = model.fused_config
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.decoder.vocab_size, (batch, seq_len), generator=generator)
    enc = config.encoder
    dtype = model.encoder.vision.conv.weight.dtype
    if enc.naflex:  # one whole image of the trained grid, pre-cut into patches
        side = enc.image_size // enc.patch_size
        encoder_input = {
            "pixel_values": torch.randn(batch, side * side,
                                        enc.num_channels * enc.patch_size**2,
                                        generator=generator).to(device, dtype),
            "spatial_shapes": torch.tensor([[side, side]] * batch, device=device),
            "pixel_attention_mask": torch.ones(batch, side * side, dtype=torch.long,
                                               device=device)}
    else:
        encoder_input = {"images": torch.randn(batch, enc.num_channels, enc.image_size,
                                               enc.image_size, generator=generator
                                               ).to(device, dtype)}
    position = seq_len // 2  # mid-sequence: text before it must not see the image
    image_tokens = tokens.clone()
    if config.new_tokens:
        image_tokens[:, position] = config.new_tokens[0].id
    mask = torch.zeros(batch, seq_len, enc.seq_len, dtype=torch.bool)
    mask[:, position:] = True
    return (tokens.to(device), image_tokens.to(device), encoder_input, mask.to(device),
            position)


def _equal_figure(equal: bool, a: torch.Tensor, b: torch.Tensor, basis: str) -> str:
    """``bitwise equal`` (with the cast it was compared after), else the largest
    difference."""
    if equal:
        return "bitwise equal" + basis.removeprefix(BITWISE)
    return f"max |diff| {_max_diff(a, b):.3g}"


@torch.no_grad()
def _check_forward(report: ValidationReport, model: DeepFusionModel, *, seed: int, batch: int,
                   seq_len: int, device: torch.device, reference: TransformerDecoder | None,
                   against: str | None, forward_basis: str,
                   reference_basis: str) -> torch.Tensor:
    """Checks 3 and 4, with as few forward passes as they need: the vision tower once (its
    output feeds the image check and the KV-cache prefill), one forward of the ``--against``
    decoder (which stands in for the plain-decoder text check), and a short cached decode.

    Args:
        forward_basis: what the fused-vs-decoder comparisons are (:data:`BITWISE`, or a cast
            under ``--dtype``).
        reference_basis: what the comparison with ``reference`` is (a cast when fuse or
            ``--dtype`` cast the tensors).

    Returns:
        The text-only logits ``[b, s, v]``.
    """
    gates = gate_values(model)
    zero_gates = all(value == 0.0 for value in gates.values())
    tokens, image_tokens, encoder_input, mask, position = _inputs(model, seed, batch, seq_len,
                                                                  device)
    encoded = model.encoder(**encoder_input)  # [b, s_e, d]: the tower runs once, shared below
    fused_text = model(tokens)
    with _gate_inputs_finite(model) as finite:
        fused_image = model.decoder(image_tokens, encoder_input=encoded, encoder_mask=mask)
    plain_image = _plain_decoder(model, with_new_tokens=True)(image_tokens)

    branch_finite = bool(finite) and all(finite)
    report.add("fusion branch is finite", branch_finite,
               f"{len(finite)} gated outputs",
               "" if branch_finite else "NaN or inf inside a fusion layer: a zero gate hides "
               "nothing when the branch is not finite (0 x NaN is NaN)")
    # text only: no encoder input reaches the fusion layers, so trained or not the logits
    # are the decoder's: the original decoder's own when it is given, else those of the
    # checkpoint's decoder tensors without the fusion layers
    if reference is not None:
        ref_text = reference(tokens)
        text_equal = _logits_agree(fused_text, ref_text)
        report.add(f"text logits equal {against}'s decoder, loaded on its own",
                   text_equal,
                   _equal_figure(text_equal, fused_text, ref_text, reference_basis),
                   "" if reference_basis == BITWISE else "the decoder loaded with that cast",
                   basis=reference_basis, proves=ORIGINAL_LOGITS)
    else:
        plain_text = _plain_decoder(model, with_new_tokens=False)(tokens)
        text_equal = _logits_agree(fused_text, plain_text)
        report.add("text-only logits equal its decoder's without the fusion layers",
                   text_equal,
                   _equal_figure(text_equal, fused_text, plain_text, forward_basis),
                   basis=forward_basis, proves=ZERO_GATE_IDENTITY)
    image_equal = _logits_agree(fused_image, plain_image)
    if zero_gates:
        where = f"token at position {position}; text before it masked from the encoder"
        report.add("logits with an image (new token mid-sequence) equal its decoder's without "
                   "the fusion layers", image_equal,
                   _equal_figure(image_equal, fused_image, plain_image, forward_basis),
                   where, basis=forward_basis, proves=ZERO_GATE_IDENTITY)
        report.identity = text_equal and image_equal and branch_finite
    else:
        moved = sum(value != 0.0 for value in gates.values())
        report.add("fusion is no longer an identity", None,
                   f"max |diff| {_max_diff(fused_image, plain_image):.3g} with an image",
                   f"{moved}/{len(gates)} gates nonzero (trained)", proves=TRAINED)
        report.identity = False
        before_fused, before_plain = fused_image[:, :position], plain_image[:, :position]
        masked_equal = _bitwise_equal(before_fused, before_plain)
        report.add("text before the image is untouched by the fusion", masked_equal,
                   _equal_figure(masked_equal, before_fused, before_plain, forward_basis),
                   basis=forward_basis)

    # KV-cache decoding: prefill up to and including the image token (at least all but the
    # last two tokens), then the rest one token at a time without the encoder input: the
    # cross-attention caches hold its keys and values
    enc_len = model.fused_config.encoder.seq_len
    dtype = model.decoder.norm.scale.dtype
    prefill = max(position + 1, seq_len - 2)
    model.setup_caches(batch, dtype, encoder_max_seq_len=enc_len, decoder_max_seq_len=seq_len)
    try:
        steps = [model.decoder(image_tokens[:, :prefill], encoder_input=encoded,
                               encoder_mask=mask[:, :prefill],
                               input_pos=torch.arange(prefill, device=device).expand(batch,
                                                                                     prefill))]
        for pos in range(prefill, seq_len):
            steps.append(model.decoder(image_tokens[:, pos:pos + 1],
                                       encoder_mask=mask[:, pos:pos + 1],
                                       input_pos=torch.full((batch, 1), pos, device=device)))
        cached = torch.cat(steps, dim=1)
    finally:
        model.reset_caches()
        _drop_caches(model)
    diff = _max_diff(cached, fused_image)
    tolerance = TOLERANCES.get(dtype, 1e-1) * max(1.0, float(fused_image.abs().max()))
    report.add("KV-cache decoding matches the full forward", diff <= tolerance,
               f"max |diff| {diff:.3g}",
               f"prefill {prefill}, {seq_len - prefill} cached steps; tolerance "
               f"{tolerance:.3g} for {dtype}", basis=TOLERANCE)
    return fused_text


def _drop_caches(model: DeepFusionModel) -> None:
    for module in model.modules():
        if hasattr(module, "kv_cache"):
            module.kv_cache = None


def _check_round_trip(report: ValidationReport, model: DeepFusionModel, path: str) -> None:
    """Check 5: the model's ``state_dict()`` (what ``save_fused`` writes) gives back the
    checkpoint it was loaded from: the same keys, and each tensor bitwise the stored one (after
    the same cast when ``--dtype`` cast the model), one tensor at a time; and it loads into a
    fresh model strictly. The state-dict hooks that rename keys are what this proves."""
    state = model.state_dict()
    differing = []
    casts = set()
    with open_any_fused(path) as (view, _):
        infos = view.infos()
        unmatched = sorted(set(state) ^ set(infos))
        for key, tensor in state.items():
            if key not in infos:
                continue
            stored = view.get_tensor(key)
            if stored.dtype != tensor.dtype:
                casts.add(tensor.dtype)
                stored = stored.to(tensor.dtype)
            if not _bitwise_equal(tensor.detach().cpu(), stored):
                differing.append(key)
    with torch.device("meta"):
        fresh = build_fused_model(model.fused_config)
    result = fresh.load_state_dict(state, strict=True, assign=True)
    strict_ok = not result.missing_keys and not result.unexpected_keys
    basis = cast_basis(None, next(iter(casts)), "--dtype") if len(casts) == 1 else BITWISE
    problems = ([f"first differing: {differing[0]}"] if differing else []) + (
        [f"{len(unmatched)} keys not in both (e.g. {unmatched[0]})"] if unmatched else []) + (
        [] if strict_ok else ["does not load strictly into a fresh model"])
    report.add("state_dict gives back the checkpoint's tensors", not problems,
               f"{len(state) - len(differing) - len(set(unmatched) & set(state))}/{len(infos)} "
               + "bitwise equal" + basis.removeprefix(BITWISE),
               "; ".join(problems) or "and loads into a fresh model strictly", basis=basis)


TRANSFORMERS_TOLERANCE = 1e-5  # float32; the same maths through other kernels


def _template_files_differ(export: str) -> list[str]:
    """The export's configuration / modeling / processing files that are not this
    fusesurgery's template byte for byte (written by another version, or edited)."""
    from pathlib import Path  # noqa: PLC0415

    from fusesurgery.hf.export import template_files  # noqa: PLC0415

    differ = []
    for name, content in template_files().items():
        path = Path(export) / name
        if not path.is_file() or path.read_bytes() != content:
            differ.append(name)
    return differ


@torch.no_grad()
def _check_transformers(report: ValidationReport, export: str, native: str, *, seed: int,
                        batch: int, seq_len: int, device: torch.device) -> None:
    """The transformers-export row: ``AutoModelForImageTextToText`` loaded from ``export``
    and ``load_fused(native)``, both in float32, give the same logits on tokens with an image
    token mid-sequence and an image (gates as stored, so a trained fusion is compared with
    its image path active). The model classes are this fusesurgery's (registered with the
    Auto classes), never code read from the directory; a row says whether the directory's
    code files are those.

    Raises:
        FuseSurgeryError: transformers is not installed.
    """
    try:
        from transformers import AutoModelForImageTextToText  # noqa: PLC0415
    except ImportError:
        raise ConfigError("the transformers check needs transformers: pip install "
                          "'fusesurgery[transformers]'") from None
    from fusesurgery.hf import register_transformers  # noqa: PLC0415

    register_transformers()
    differ = _template_files_differ(export)
    report.add("transformers export's code files are this fusesurgery's", not differ or None,
               "identical" if not differ else f"{len(differ)} differ",
               "" if not differ else f"{', '.join(differ)}: another version wrote them or they "
               "were edited; the row below ran this version's classes")
    model = load_fused(native, device=device, dtype=torch.float32)
    model.eval()
    _, image_tokens, encoder_input, mask, position = _inputs(model, seed, batch, seq_len,
                                                             device)
    native_logits = model(image_tokens, encoder_input=encoder_input, encoder_mask=mask)
    del model
    exported = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32)
    exported.to(device).eval()
    # a NaFlex tower's inputs (pixel_values, spatial_shapes, pixel_attention_mask) go as they are
    image = ({"pixel_values": encoder_input["images"]} if "images" in encoder_input
             else encoder_input)
    logits = exported(input_ids=image_tokens, **image).logits
    equal = _bitwise_equal(logits, native_logits)
    diff = _max_diff(logits, native_logits)
    tolerance = TRANSFORMERS_TOLERANCE * max(1.0, float(native_logits.abs().max()))
    report.add("transformers export's logits with an image equal load_fused's", diff <= tolerance,
               "bitwise equal" if equal else f"max |diff| {diff:.3g}",
               f"float32, image token at position {position}, the mask derived from it"
               + ("" if equal else f"; tolerance {tolerance:.3g}"),
               basis=BITWISE if equal else TOLERANCE)


def _validate_with_export(report: ValidationReport, path: str, **options) -> None:
    """The transformers row for a native fused checkpoint: exported to a temporary directory
    (as much disk as the checkpoint), loaded with transformers and compared."""
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from fusesurgery.hf import export_transformers  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="fusesurgery-validate-") as scratch:
        export = Path(scratch) / "hf"
        export_transformers(path, export, durable=False)
        _check_transformers(report, str(export), path, **options)


def validate_layout(path: str | os.PathLike[str]) -> ValidationReport:
    """The header-level part of :func:`validate_fused`: the fused checkpoint opens (index and
    shards agree, ``fusion_config.json`` parses) and its keys, shapes and dtypes are exactly
    the rebuilt model's. Reads no tensor data, so it costs seconds at any size.

    Raises:
        FuseSurgeryError: unreadable input or not a fused checkpoint.
    """
    path = str(path)
    report = ValidationReport(path=path, device="none (header-level checks only)")
    _check_layout(report, path)
    return report


def _refuse_swapped(path: str, against: str | os.PathLike[str] | None) -> None:
    """Name the likely mistake when the two paths were given the wrong way round: the first
    is not a fused directory and the ``--against`` one is.

    Raises:
        ConfigError: ``path`` has no ``fusion_config.json`` and ``against`` has one.
    """
    if against is None:
        return
    first, second = Path(path), Path(against)
    if (not (first / FUSION_CONFIG_FILE).is_file() and first.exists()
            and (second / FUSION_CONFIG_FILE).is_file()):
        raise ConfigError(
            f"{path} is not a fused checkpoint but {against} is: the arguments look swapped; "
            f"give the fused directory first: fusesurgery validate {against} --against {path}")


def validate_fused(
    path: str | os.PathLike[str],
    *,
    against: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    batch: int = 1,
    seq_len: int = 8,
    transformers: bool | None = None,
) -> ValidationReport:
    """Validate a fused checkpoint written by fusesurgery, or its transformers export.

    Args:
        path: the fused checkpoint directory, or a directory ``convert --to transformers``
            wrote (its fused checkpoint, read in memory under the native names, goes through
            every check; no native copy is written).
        against: the original decoder (or vision tower): its tensors must be the fused
            checkpoint's, bit for bit (or after the same cast, when fuse cast them), and its
            own logits the fused model's. Without it nothing is compared with the original;
            a row says so.
        device: ``cpu`` or ``cuda`` (``cuda:N``) for the forward checks.
        dtype: run the forward checks in this dtype (copies the weights); None keeps the
            stored dtypes and the model mmap-backed.
        seed: seed of the random tokens and images.
        batch: batch size of the forward checks.
        seq_len: sequence length of the forward checks (at least 4).
        transformers: add the row that loads the transformers export with transformers and
            compares its logits with ``load_fused``'s (float32, with an image); for a native
            checkpoint the export is written to a temporary directory. None: only when
            ``path`` is an export.

    Returns:
        The report; ``report.ok`` is False when any check failed, ``report.verdict()`` says
        what the rows proved, ``report.bit_for_bit`` whether that is "the original decoder,
        bit for bit".

    Raises:
        FuseSurgeryError: unreadable input, not a fused checkpoint, an unknown device or no
            such CUDA device.
    """
    path = str(path)
    check_device(device)
    check_int("seed", seed, 0, SEED_LIMIT)
    check_int("batch", batch, 1, 2**31)
    check_int("seq_len", seq_len, 1, 2**31)
    if seq_len < 4:
        raise ConfigError(f"seq_len must be at least 4, got {seq_len}")
    report = _validate_fused(str(local_export_path(path)), against=against, device=device,
                             dtype=dtype, seed=seed, batch=batch, seq_len=seq_len,
                             transformers=transformers)
    report.path = path  # a Hub repo of an export is checked in its fetched directory
    return report


def _validate_fused(path: str, *, against: str | os.PathLike[str] | None, device: str,
                    dtype: torch.dtype | None, seed: int, batch: int, seq_len: int,
                    transformers: bool | None) -> ValidationReport:
    """:func:`validate_fused` of a local export, or of anything else its readers open."""
    export = is_export_directory(path)
    if export:
        from fusesurgery.io._files import read_side_file  # noqa: PLC0415

        if is_any_export(json.loads(read_side_file(Path(path) / "config.json"))):
            # fuse --format transformers: any family, checked through transformers' classes
            from fusesurgery.hf.validate_export import validate_export  # noqa: PLC0415

            return validate_export(path, against=against, device=device, dtype=dtype,
                                   seed=seed, batch=batch, seq_len=seq_len)
    else:
        _refuse_swapped(path, against)
    with open_any_fused(path) as (_, config):
        if config.encoder is None:
            raise ConfigError(f"{path}: its vision side (Mllama's) has no native module, so "
                              "validate cannot rebuild the model; load its fused decoder with "
                              "fusesurgery.load_fused(path, part='decoder')")
    torch_device = torch.device(device)
    report = ValidationReport(path=path, device=str(torch_device))
    _check_layout(report, path)
    found = None
    if against is not None:
        found = _check_against(report, path, str(against))
    if found is None or found.part != "decoder":
        why = "no --against" if found is None else "--against gave the vision tower"
        report.add("original decoder tensors and logits compared with the source's", None,
                   f"{NOT_COMPARED}: {why}", "the checks below use the checkpoint's own "
                   "decoder tensors; give --against DECODER to compare them with the original",
                   basis=NOT_COMPARED)
    model = load_fused(path, device=torch_device, dtype=dtype)
    model.eval()
    fused_dtype = model.decoder.norm.scale.dtype
    forward_basis = BITWISE if dtype is None else cast_basis(None, dtype, "--dtype")
    reference, reference_basis = None, BITWISE
    if found is not None and found.part == "decoder":
        with open_checkpoint(against) as source:
            overrides = _against_overrides(source, model.fused_config, "decoder")
        # compare in the fused decoder's dtypes: no cast unless fuse (or --dtype) cast
        reference_dtype = dtype if dtype is not None else (fused_dtype if found.casts
                                                           else None)
        reference = load_decoder(against, dtype=reference_dtype, device=torch_device,
                                 overrides=overrides)
        reference.eval()
        if dtype is not None:
            reference_basis = cast_basis(None, dtype, "--dtype")
        elif found.casts:
            sources = {source for source, _ in found.casts}
            reference_basis = cast_basis(next(iter(sources)) if len(sources) == 1 else None,
                                         fused_dtype)
    text = _check_forward(report, model, seed=seed, batch=batch, seq_len=seq_len,
                          device=torch_device, reference=reference, against=str(against),
                          forward_basis=forward_basis, reference_basis=reference_basis)
    changed = model.fused_config.trained_originals
    if changed:  # what fusion_config.json records: the logits alone cannot tell
        report.add("original tensors are the sources'", None,
                   f"{len(changed)} changed by training",
                   f"e.g. {changed[0]}, as fusion_config.json records: no longer the "
                   "sources' model", proves=TRAINED)
        report.identity = False
    if torch_device.type == "cuda" and against is not None:
        cpu_model = load_fused(path, dtype=dtype)
        cpu_model.eval()
        tokens = _inputs(cpu_model, seed, batch, seq_len, torch.device("cpu"))[0]
        with torch.no_grad():
            cpu_text = cpu_model(tokens)
        diff = _max_diff(cpu_text, text.cpu())
        dt = cpu_model.decoder.norm.scale.dtype
        tolerance = TOLERANCES.get(dt, 1e-1) * max(1.0, float(cpu_text.abs().max()))
        report.add("GPU logits match CPU logits", diff <= tolerance, f"max |diff| {diff:.3g}",
                   f"tolerance {tolerance:.3g} for {dt}", basis=TOLERANCE)
    _check_round_trip(report, model, path)
    del model
    if export:  # checked in memory through its fused checkpoint; then what transformers loads
        from fusesurgery.hf.validate_export import add_processor_row  # noqa: PLC0415

        add_processor_row(report, path)
        if transformers is not False:
            _check_transformers(report, path, path, seed=seed, batch=batch, seq_len=seq_len,
                                device=torch_device)
    elif transformers:
        _validate_with_export(report, path, seed=seed, batch=batch, seq_len=seq_len,
                              device=torch_device)
    return report


__all__ = ["BITWISE", "NOT_COMPARED", "TOLERANCE", "Check", "ValidationReport", "cast_basis",
           "validate_fused", "validate_layout"]
