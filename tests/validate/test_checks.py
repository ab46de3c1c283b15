"""``validate_fused``: each row says what it compared, the verdict claims only what the rows
proved, and the vision tower runs once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fusesurgery
from fusesurgery.modules import TransformerDecoder, VisionTransformer
from fusesurgery.validate import validate_fused
from fusesurgery.validate.checks import (
    BITWISE,
    FAIL,
    INFO,
    NOT_COMPARED,
    ORIGINAL_LOGITS,
    ORIGINAL_TENSORS,
    PASS,
    ZERO_GATE_IDENTITY,
    Check,
    ValidationReport,
    _bitwise_equal,
    _check_round_trip,
    cast_basis,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DECODER, ENCODER = EXAMPLES / "tiny-llama", EXAMPLES / "tiny-clip-vision"  # bf16
BIT_FOR_BIT = "the fused model is the original decoder, bit for bit"


def _row(report: ValidationReport, proves: str) -> Check:
    (row,) = [check for check in report.checks if check.proves == proves]
    return row


def test_bitwise_against_the_source_is_bit_for_bit(fused_example):
    report = validate_fused(fused_example, against=DECODER)
    assert report.ok and report.identity and report.bit_for_bit
    assert report.verdict() == f"all checks passed; {BIT_FOR_BIT}"
    tensors = _row(report, ORIGINAL_TENSORS)
    assert tensors.basis == BITWISE and tensors.figure == "39/39 equal bitwise"
    assert _row(report, ORIGINAL_LOGITS).basis == BITWISE
    assert not any(check.basis == NOT_COMPARED for check in report.checks)


@pytest.mark.parametrize("dtype, name", [("f32", "float32"), ("f16", "float16")])
def test_after_a_fuse_cast_no_row_claims_the_sources_bits(tmp_path, dtype, name):
    fused = tmp_path / "fused"
    fusesurgery.fuse(ENCODER, DECODER, fused, every=2, dtype=dtype)
    report = validate_fused(fused, against=DECODER)
    assert report.ok and report.identity  # zero gates: still its decoder's logits, bitwise
    assert not report.bit_for_bit
    cast = f"bitwise after a cast bfloat16 -> {name}"
    tensors = _row(report, ORIGINAL_TENSORS)
    assert tensors.basis == cast and tensors.figure == f"39/39 equal: {cast}"
    assert "not the source's bits" in tensors.detail
    logits = _row(report, ORIGINAL_LOGITS)
    assert logits.basis == cast
    assert logits.figure == f"bitwise equal after a cast bfloat16 -> {name}"
    verdict = report.verdict()
    assert BIT_FOR_BIT not in verdict and "bit for bit" not in verdict.split(";")[1]
    assert f"{cast}, not the source's bits" in verdict
    assert report.to_dict()["verdict"] == verdict and report.to_dict()["bit_for_bit"] is False


def test_without_against_nothing_is_claimed_about_the_original(fused_example):
    report = validate_fused(fused_example)
    assert report.ok and report.identity and not report.bit_for_bit
    (row,) = [check for check in report.checks if check.basis == NOT_COMPARED]
    assert row.status == INFO and row.figure == "not compared: no --against"
    assert not [check for check in report.checks
                if check.proves in (ORIGINAL_TENSORS, ORIGINAL_LOGITS)]
    verdict = report.verdict()
    assert BIT_FOR_BIT not in verdict and "original decoder's" not in verdict
    assert verdict.endswith("the decoder was not compared with the original (no --against)")


def test_against_the_vision_tower_says_the_decoder_was_not_compared(fused_example):
    report = validate_fused(fused_example, against=ENCODER)
    assert report.ok and not report.bit_for_bit
    assert _row(report, ORIGINAL_TENSORS).name.startswith("original encoder tensors")
    (row,) = [check for check in report.checks if check.basis == NOT_COMPARED]
    assert row.figure == "not compared: --against gave the vision tower"


def test_validate_dtype_says_the_forward_checks_ran_cast(fused_example):
    report = validate_fused(fused_example, against=DECODER, dtype=torch.float32)
    assert report.ok and not report.bit_for_bit
    assert _row(report, ORIGINAL_TENSORS).basis == BITWISE  # the stored tensors: uncast
    cast = cast_basis(None, torch.float32, "--dtype")
    assert _row(report, ORIGINAL_LOGITS).basis == cast
    assert {check.basis for check in report.checks if check.proves == ZERO_GATE_IDENTITY} \
        == {cast}
    assert BIT_FOR_BIT not in report.verdict()


def test_tower_runs_once_and_the_decoder_as_few_times_as_the_checks_need(fused_example,
                                                                         monkeypatch):
    calls = {"tower": 0, "full": 0, "cached steps": 0}
    tower_forward, decoder_forward = VisionTransformer.forward, TransformerDecoder.forward

    def count_tower(self, *args, **kwargs):
        calls["tower"] += 1
        return tower_forward(self, *args, **kwargs)

    def count_decoder(self, tokens, **kwargs):
        calls["full" if tokens.shape[1] > 1 else "cached steps"] += 1
        return decoder_forward(self, tokens, **kwargs)

    monkeypatch.setattr(VisionTransformer, "forward", count_tower)
    monkeypatch.setattr(TransformerDecoder, "forward", count_decoder)
    report = validate_fused(fused_example, against=DECODER)
    assert report.ok
    # text (fused, --against decoder), with an image (fused, plain), the KV-cache prefill
    assert calls == {"tower": 1, "full": 5, "cached steps": 2}


def test_round_trip_row_fails_when_state_dict_is_not_the_checkpoint(fused_example):
    model = fusesurgery.load_fused(fused_example)
    report = ValidationReport(path=str(fused_example))
    _check_round_trip(report, model, str(fused_example))
    assert report.checks[-1].status == PASS
    model.decoder.norm.scale = nn.Parameter(model.decoder.norm.scale.detach() + 1)
    report = ValidationReport(path=str(fused_example))
    _check_round_trip(report, model, str(fused_example))
    row = report.checks[-1]
    assert row.status == FAIL and "decoder.norm.scale" in row.detail


def test_bitwise_equal_compares_bits_not_values():
    zero = torch.zeros(5, dtype=torch.bfloat16)
    assert torch.equal(zero, -zero) and not _bitwise_equal(zero, -zero)
    nan = torch.full((3,), float("nan"))
    assert not torch.equal(nan, nan.clone()) and _bitwise_equal(nan, nan.clone())
    raw = torch.arange(11, dtype=torch.int8)
    shifted = raw[1:9]  # 8 bytes at an odd storage offset
    assert _bitwise_equal(shifted, shifted.clone())
    other = shifted.clone()
    other[7] += 1
    assert not _bitwise_equal(shifted, other)
    assert not _bitwise_equal(raw[:3], raw[:3].to(torch.int16))  # dtypes differ


def _report(*rows: tuple[str, str, str]) -> ValidationReport:
    report = ValidationReport(path="x", identity=True)
    for proves, status, basis in rows:
        report.checks.append(Check(f"row {proves}", status, "", "", basis, proves))
    return report


def test_verdict_is_derived_from_the_rows():
    cast = cast_basis(torch.bfloat16, torch.float32)
    full = [(ORIGINAL_TENSORS, PASS, BITWISE), (ORIGINAL_LOGITS, PASS, BITWISE),
            (ZERO_GATE_IDENTITY, PASS, BITWISE)]
    assert _report(*full).bit_for_bit
    assert BIT_FOR_BIT in _report(*full).verdict()
    for index in range(3):  # any one of the three rows missing, cast or failed: no claim
        rows = full[:index] + full[index + 1:]
        assert not _report(*rows).bit_for_bit
        changed = list(full)
        changed[index] = (full[index][0], PASS, cast)
        assert not _report(*changed).bit_for_bit
        assert BIT_FOR_BIT not in _report(*changed).verdict()
        changed[index] = (full[index][0], FAIL, BITWISE)
        assert _report(*changed).verdict() == "some checks FAILED"


def test_nan_logits_with_the_same_bits_are_no_agreement(tmp_path):
    """A decoder with a NaN in its final norm gives NaN logits with and without the fusion
    layers, the same bits: the logit rows fail rather than claim 'bitwise equal'."""
    import shutil

    from safetensors.torch import load_file, save_file

    decoder = tmp_path / "decoder"
    shutil.copytree(DECODER, decoder)
    tensors = load_file(decoder / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, decoder / "model.safetensors", metadata={"format": "pt"})
    fusesurgery.fuse(ENCODER, decoder, tmp_path / "fused", every=2)
    report = validate_fused(tmp_path / "fused")
    rows = [check for check in report.checks if check.proves == ZERO_GATE_IDENTITY
            and "logits" in check.name]
    assert len(rows) == 2 and all(check.status == FAIL for check in rows), rows
    assert not report.ok and not report.identity
