"""unfuse and convert of fused checkpoints: what each output says about itself (configs that
transformers' own classes load, token ids, dtype) and the inputs refused in one line."""

from __future__ import annotations

import pytest

from tests.hardening.conftest import assert_one_line_error, cli
from tests.mllama_models import save_mllama_causal, save_mllama_conditional


@pytest.mark.parametrize("kind", ["causal", "conditional"])
def test_encoder_of_an_mllama_checkpoint_is_refused_in_one_line(tmp_path, kind):
    save = save_mllama_causal if kind == "causal" else save_mllama_conditional
    path = save(tmp_path / kind)
    fragment = "holds no vision encoder" if kind == "causal" else "tiled vision model"
    assert_one_line_error(cli("unfuse", path, "-o", tmp_path / "out", "--part", "encoder"),
                          fragment)
    assert not (tmp_path / "out").exists()
