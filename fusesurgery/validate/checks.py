"""``validate``: prove a fused checkpoint is what it claims to be.

Each check is a row with a figure and a status. A fused model whose gates are all zero must
compute exactly (bit for bit) what the original decoder computed; a trained one is reported as
no longer an identity, with the size of the difference. The model is loaded mmap-backed in its
own dtype, so a checkpoint larger than memory validates; tensors are compared one at a time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from fusesurgery._arguments import SEED_LIMIT, check_int
from fusesurgery._device import check_device
from fusesurgery.convert import apply_plan_entry, detect_model, plan_conversion
from fusesurgery.convert.detect import detect_layout
from fusesurgery.errors import ConfigError
from fusesurgery.io import open_checkpoint
from fusesurgery.modules import (
    DeepFusionModel,
    FusionLayer,
    TanhGate,
    TransformerDecoder,
)
from fusesurgery.surgery.fuse_plan import fused_key_of, native_key_of
from fusesurgery.surgery.fused import build_fused_model, load_fused, open_fused
from fusesurgery.surgery.load import load_decoder
from fusesurgery.write.save_fused import gate_values

PASS, FAIL, INFO = "pass", "fail", "info"
# Tolerances for results computed two ways in floating point (cached vs full decoding, CPU vs
# GPU): these agree closely, never bitwise.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1,
}


@dataclass(frozen=True)
class Check:
    """One validation row.

    Args:
        name: what is checked.
        status: ``pass``, ``fail`` or ``info`` (reported, not a failure).
        figure: the measured number or count, as text.
        detail: what it means.
    """

    name: str
    status: str
    figure: str
    detail: str = ""


@dataclass
class ValidationReport:
    """The result of :func:`validate_fused`.

    Args:
        path: the fused checkpoint.
        checks: the rows, in order.
        identity: every gate is zero and the fused logits equal the decoder's bit for bit.
        device: where the forward checks ran.
    """

    path: str
    checks: list[Check] = field(default_factory=list)
    identity: bool | None = None
    device: str = "cpu"

    @property
    def ok(self) -> bool:
        return all(check.status != FAIL for check in self.checks)

    def add(self, name: str, passed: bool | None, figure: object, detail: str = "") -> None:
        status = INFO if passed is None else (PASS if passed else FAIL)
        self.checks.append(Check(name, status, str(figure), detail))

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "identity": self.identity,
                "device": self.device,
                "checks": [check.__dict__ for check in self.checks]}

    def summary(self) -> str:
        lines = [f"{c.status.upper():4}  {c.name}: {c.figure}" + (f" ({c.detail})" if c.detail
                                                                    else "")
                 for c in self.checks]
        verdict = "all checks passed" if self.ok else "SOME CHECKS FAILED"
        return "\n".join([*lines, verdict])


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.detach().reshape(-1).contiguous().view(torch.uint8),
                       b.detach().reshape(-1).contiguous().view(torch.uint8))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max().item()) if a.numel() else 0.0


def _check_layout(report: ValidationReport, path: str) -> None:
    """Check 1: the keys, shapes and dtypes are exactly those of the model the config
    describes."""
    with open_fused(path) as (source, config):
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


def _check_against(report: ValidationReport, path: str, against: str) -> str:
    """Check 2: the original tensors are the source's, bit for bit, and the key set is the
    source's plus exactly the planned fusion keys. Returns the part compared."""
    with open_fused(path) as (fused, config), open_checkpoint(against) as source:
        overrides = _against_overrides(source, config, detect_layout(source.infos())[0])
        detected = detect_model(source.infos(), source.config, source.config_file, overrides)
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
        compared = 0
        for entry in plan.entries:
            key = fused_key_of(part, entry.target_key)
            if key not in fused_infos:
                continue
            theirs = fused.get_tensor(key)
            if theirs.dtype != entry.dtype:  # fused with a cast: compare with the same cast
                entry = type(entry)(**{**entry.__dict__, "dtype": theirs.dtype})
            ours = apply_plan_entry(entry, source.get_tensor(entry.source_key))
            compared += 1
            if not _bitwise_equal(ours, theirs):
                differing.append(key)
        report.add(f"original {part} tensors bitwise equal to {against}", not differing,
                   f"{compared - len(differing)}/{compared} equal",
                   f"first differing: {differing[0]}" if differing else "")
    return part


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
    images = torch.randn(batch, enc.num_channels, enc.image_size, enc.image_size,
                         generator=generator)
    position = seq_len // 2  # mid-sequence: text before it must not see the image
    image_tokens = tokens.clone()
    if config.new_tokens:
        image_tokens[:, position] = config.new_tokens[0].id
    mask = torch.zeros(batch, seq_len, enc.seq_len, dtype=torch.bool)
    mask[:, position:] = True
    dtype = model.encoder.vision.conv.weight.dtype
    return (tokens.to(device), image_tokens.to(device), images.to(device, dtype),
            mask.to(device), position)


@torch.no_grad()
def _check_forward(report: ValidationReport, model: DeepFusionModel, *, seed: int, batch: int,
                   seq_len: int, device: torch.device, reference: TransformerDecoder | None,
                   against: str | None) -> torch.Tensor:
    """Checks 3 and 4. Returns the text-only logits."""
    gates = gate_values(model)
    zero_gates = all(value == 0.0 for value in gates.values())
    tokens, image_tokens, images, mask, position = _inputs(model, seed, batch, seq_len, device)
    fused_text = model(tokens)
    plain_text = _plain_decoder(model, with_new_tokens=False)(tokens)
    with _gate_inputs_finite(model) as finite:
        fused_image = model(image_tokens, encoder_input={"images": images}, encoder_mask=mask)
    plain_image = _plain_decoder(model, with_new_tokens=True)(image_tokens)

    branch_finite = bool(finite) and all(finite)
    report.add("fusion branch is finite", branch_finite,
               f"{len(finite)} gated outputs",
               "" if branch_finite else "NaN or inf inside a fusion layer: a zero gate hides "
               "nothing when the branch is not finite (0 x NaN is NaN)")
    text_equal = _bitwise_equal(fused_text, plain_text)
    image_equal = _bitwise_equal(fused_image, plain_image)
    # text only: no encoder input reaches the fusion layers, so trained or not the logits
    # are the decoder's
    if reference is not None:
        ref_text = reference(tokens)
        ref_equal = _bitwise_equal(fused_text, ref_text)
        report.add(f"text logits equal {against}'s decoder, loaded on its own", ref_equal,
                   "bitwise equal" if ref_equal else
                   f"max |diff| {_max_diff(fused_text, ref_text):.3g}")
    report.add("text-only logits equal the original decoder's", text_equal,
               "bitwise equal" if text_equal else
               f"max |diff| {_max_diff(fused_text, plain_text):.3g}")
    if zero_gates:
        report.add("logits with an image (new token mid-sequence) equal the decoder's",
                   image_equal, "bitwise equal" if image_equal else
                   f"max |diff| {_max_diff(fused_image, plain_image):.3g}",
                   f"token at position {position}; text before it masked from the encoder")
        report.identity = text_equal and image_equal and branch_finite
    else:
        moved = sum(value != 0.0 for value in gates.values())
        report.add("fusion is no longer an identity", None,
                   f"max |diff| {_max_diff(fused_image, plain_image):.3g} with an image",
                   f"{moved}/{len(gates)} gates nonzero (trained)")
        report.identity = False
        before_fused, before_plain = fused_image[:, :position], plain_image[:, :position]
        masked_equal = _bitwise_equal(before_fused, before_plain)
        report.add("text before the image is untouched by the fusion", masked_equal,
                   "bitwise equal" if masked_equal else
                   f"max |diff| {_max_diff(before_fused, before_plain):.3g}")

    # KV-cache decoding: prefill up to and including the image token, then one token at a
    # time without the encoder input (the cross-attention caches hold its keys and values)
    enc_len = model.fused_config.encoder.seq_len
    dtype = model.decoder.norm.scale.dtype
    model.setup_caches(batch, dtype, encoder_max_seq_len=enc_len, decoder_max_seq_len=seq_len)
    try:
        prefill = position + 1
        steps = [model(image_tokens[:, :prefill], encoder_input={"images": images},
                       encoder_mask=mask[:, :prefill],
                       input_pos=torch.arange(prefill, device=device).expand(batch, prefill))]
        for pos in range(prefill, seq_len):
            steps.append(model(image_tokens[:, pos:pos + 1], encoder_mask=mask[:, pos:pos + 1],
                               input_pos=torch.full((batch, 1), pos, device=device)))
        cached = torch.cat(steps, dim=1)
    finally:
        model.reset_caches()
        _drop_caches(model)
    diff = _max_diff(cached, fused_image)
    tolerance = TOLERANCES.get(dtype, 1e-1) * max(1.0, float(fused_image.abs().max()))
    report.add("KV-cache decoding matches the full forward", diff <= tolerance,
               f"max |diff| {diff:.3g}", f"tolerance {tolerance:.3g} for {dtype}")
    return fused_text


def _drop_caches(model: DeepFusionModel) -> None:
    for module in model.modules():
        if hasattr(module, "kv_cache"):
            module.kv_cache = None


def _check_round_trip(report: ValidationReport, model: DeepFusionModel) -> None:
    """Check 5: state_dict -> safetensors -> load gives the same tensors, bit for bit (one
    tensor at a time, so memory stays one tensor), and loads into a fresh model strictly."""
    state = model.state_dict()
    differing = []
    for key, tensor in state.items():
        # through safetensors' own serialisation, in memory: one tensor at a time
        back = load_safetensors_bytes(save_safetensors_bytes({key: tensor.detach().contiguous()
                                                              .cpu()}))[key]
        if not _bitwise_equal(back, tensor.detach().cpu()):
            differing.append(key)
    with torch.device("meta"):
        fresh = build_fused_model(model.fused_config)
    result = fresh.load_state_dict(state, strict=True, assign=True)
    strict_ok = not result.missing_keys and not result.unexpected_keys
    report.add("state_dict -> save -> load is bitwise", not differing and strict_ok,
               f"{len(state) - len(differing)}/{len(state)} tensors",
               f"first differing: {differing[0]}" if differing else "")


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


def validate_fused(
    path: str | os.PathLike[str],
    *,
    against: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    batch: int = 1,
    seq_len: int = 8,
) -> ValidationReport:
    """Validate a fused checkpoint written by fusesurgery.

    Args:
        path: the fused checkpoint directory.
        against: the original decoder (or vision tower): its tensors must be the fused
            checkpoint's, bit for bit, and its own logits the fused model's.
        device: ``cpu`` or ``cuda`` (``cuda:N``) for the forward checks.
        dtype: run the forward checks in this dtype (copies the weights); None keeps the
            stored dtypes and the model mmap-backed.
        seed: seed of the random tokens and images.
        batch: batch size of the forward checks.
        seq_len: sequence length of the forward checks (at least 4).

    Returns:
        The report; ``report.ok`` is False when any check failed.

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
    with open_fused(path) as (_, config):
        if config.encoder is None:
            raise ConfigError(f"{path}: its vision side (Mllama's) has no native module, so "
                              "validate cannot rebuild the model; load its fused decoder with "
                              "fusesurgery.load_fused(path, part='decoder')")
    torch_device = torch.device(device)
    report = ValidationReport(path=path, device=str(torch_device))
    _check_layout(report, path)
    part = None
    if against is not None:
        part = _check_against(report, path, str(against))
    model = load_fused(path, device=torch_device, dtype=dtype)
    model.eval()
    reference = None
    if part == "decoder":
        with open_checkpoint(against) as source:
            overrides = _against_overrides(source, model.fused_config, "decoder")
        reference = load_decoder(against, dtype=dtype, device=torch_device, overrides=overrides)
        if dtype is None:  # compare in the fused decoder's dtypes: no cast unless fuse cast
            fused_dtype = model.decoder.norm.scale.dtype
            if reference.norm.scale.dtype != fused_dtype:
                reference = load_decoder(against, dtype=fused_dtype, device=torch_device,
                                         overrides=overrides)
        reference.eval()
    text = _check_forward(report, model, seed=seed, batch=batch, seq_len=seq_len,
                          device=torch_device, reference=reference, against=str(against))
    changed = model.fused_config.trained_originals
    if changed:  # what fusion_config.json records: the logits alone cannot tell
        report.add("original tensors are the sources'", None,
                   f"{len(changed)} changed by training",
                   f"e.g. {changed[0]}, as fusion_config.json records: no longer the "
                   "sources' model")
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
                   f"tolerance {tolerance:.3g} for {dt}")
    _check_round_trip(report, model)
    return report


__all__ = ["Check", "ValidationReport", "validate_fused"]
