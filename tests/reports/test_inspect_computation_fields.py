"""``inspect`` shows every setting that changes what the model computes: a sliding window the
native config has no field for (beside the fields, marked not modelled), and a fused
checkpoint's fusion order, norm epsilons and projection as its fusion_config.json records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fusesurgery
from tests.hardening.conftest import EXAMPLES, cli, edit_config


def config_rows(stdout: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.strip()}


def test_a_sliding_window_is_shown_beside_the_fields(tmp_path: Path):
    # the tiny Llama's weights are a Mistral's: Mistral is Llama with a sliding window
    mistral = Path(shutil.copytree(EXAMPLES / "tiny-llama", tmp_path / "mistral"))
    edit_config(mistral, model_type="mistral", architectures=["MistralForCausalLM"],
                sliding_window=16, max_position_embeddings=64, rope_scaling=...)
    result = cli("inspect", mistral)
    assert result.exit_code == 0, result.output
    rows = config_rows(result.stdout)
    assert rows["sliding_window"] == ["16", "read"]  # modelled: a field like the others
    assert rows["sliding_layers"][-1] == "read"
    payload = json.loads(cli("inspect", mistral, "--json").stdout)
    assert payload["unmodelled"] == {}
    # a file too silent to place the window (no num_hidden_layers): read, not modelled
    edit_config(mistral, num_hidden_layers=...)
    result = cli("inspect", mistral)
    assert result.exit_code == 0, result.output
    assert config_rows(result.stdout)["sliding_window"] == ["16", "read,", "not", "modelled",
                                                            "(see", "notes)"]
    payload = json.loads(cli("inspect", mistral, "--json").stdout)
    assert payload["unmodelled"] == {"sliding_window": 16}
    plain = json.loads(cli("inspect", EXAMPLES / "tiny-llama", "--json").stdout)
    assert plain["unmodelled"] == {}


def test_a_fused_checkpoint_shows_its_fusion_settings(tmp_path: Path):
    out = tmp_path / "fused"
    fusesurgery.fuse(EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama", out, every=2,
                     fusion_after=True, projection="linear")
    result = cli("inspect", out)
    assert result.exit_code == 0, result.output
    lines = [line.rstrip() for line in result.stdout.splitlines()]
    assert ("order          each fusion layer runs after its decoder layer (from "
            "fusion_config.json)") in lines
    assert "norm eps       1e-05 (ca_norm, mlp_norm), 1e-05 (q/k norms)" in lines
    assert "projection     linear" in lines
    fusion = json.loads(cli("inspect", out, "--json").stdout)["fusion"]
    assert (fusion["fusion_first"], fusion["projection"], fusion["ca_norm_eps"]) == (
        False, "linear", 1e-05)
    assert fusion["settings_source"] == "fusion_config.json"
