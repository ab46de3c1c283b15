"""Class 5: what a config states is bounded by what is needed. A decoder stating 10**12
positions fuses, validates and loads (its RoPE table grows with the positions used); every
argument is checked before any long work, and refused in one line naming it."""

from __future__ import annotations

import fusesurgery
from tests.hardening.conftest import cli, edit_config
from tests.hardening.test_no_hangs import bounded


def test_a_decoder_stating_a_trillion_positions_validates(clip, llama, tmp_path):
    edit_config(llama, max_position_embeddings=10**12)
    out = tmp_path / "fused"
    with bounded(120):
        fusesurgery.fuse(clip, llama, out, every=2)
        result = cli("validate", out, "--against", llama)
    assert result.exit_code == 0, result.output
    assert "bit for bit" in result.stdout
    model = fusesurgery.load_fused(out)
    assert model.decoder.max_seq_len == 10**12
    assert sum(buffer.numel() for buffer in model.buffers()) < 10**6
