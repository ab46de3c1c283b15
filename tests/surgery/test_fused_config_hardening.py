"""A damaged ``fusion_config.json`` is a ConfigError naming the file and the field (exit 2 from
the command line), never a crash further on (``float()`` on a gate in push's card, ``dict()``
on a list of dtypes, ``.get`` on a source record that is a string)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fusesurgery.errors import ConfigError
from fusesurgery.surgery.fused_config import DTYPE_NAMES, fused_config_from_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
ORIGIN = "/some/out/fusion_config.json"


@pytest.fixture
def doc(fused_example: Path) -> dict[str, Any]:
    return json.loads((fused_example / "fusion_config.json").read_text())


def test_the_written_document_parses(doc: dict[str, Any]):
    config = fused_config_from_dict(doc, ORIGIN)
    assert config.gates == doc["gates"] and all(v == 0.0 for v in config.gates.values())
    assert set(config.dtypes.values()) <= set(DTYPE_NAMES)
    assert config.to_dict()["sources"] == doc["sources"]


GATE = "decoder.layers.1.fusion_layer.ca_scale.scale"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("gates", None, "gates must be an object, not null"),
    ("gates", [1], "gates must be an object, not a list"),
    ("gates", {GATE: None}, f"gates['{GATE}'] must be a finite number, not null"),
    ("gates", {GATE: [1]}, f"gates['{GATE}'] must be a finite number, not a list"),
    ("gates", {GATE: "abc"}, f"gates['{GATE}'] must be a finite number, not a string"),
    ("gates", {GATE: True}, f"gates['{GATE}'] must be a finite number, not true"),
    ("gates", {GATE: math.nan}, f"gates['{GATE}'] must be a finite number, not nan"),
    ("gates", {GATE: math.inf}, f"gates['{GATE}'] must be a finite number, not inf"),
    ("sources", "x", "sources must be an object, not a string"),
    ("sources", {"decoder": "x"}, "sources['decoder'] must be an object, not a string"),
    ("sources", {"encoder": None}, "sources['encoder'] must be an object, not null"),
    ("dtypes", ["a"], "dtypes must be an object, not a list"),
    ("dtypes", {"decoder": "a"}, "dtypes['decoder'] is 'a', not a dtype name (float64, "),
    ("dtypes", {"fusion": 16}, "dtypes['fusion'] is a number, not a dtype name"),
    ("seed", "abc", "seed must be an integer, not a string"),
    ("seed", 1.5, "seed must be an integer, not a number"),
    ("trained", "false", "trained must be true or false, not a string"),
    ("fusesurgery_version", 1, "fusesurgery_version must be a string, not a number"),
    ("embedding_init", None, "embedding_init None is not one of ('mean', 'zeros', 'normal')"),
])
def test_a_bad_field_is_named(doc: dict[str, Any], field: str, value: Any, message: str):
    doc[field] = value
    with pytest.raises(ConfigError) as error:
        fused_config_from_dict(doc, ORIGIN)
    assert str(error.value).startswith(f"{ORIGIN}: {message}"), str(error.value)


def test_not_an_object():
    with pytest.raises(ConfigError, match=f"^{ORIGIN} is not a fusesurgery fusion config "
                                          r"\(a JSON list, not an object\)"):
        fused_config_from_dict([], ORIGIN)  # type: ignore[arg-type]


def test_integer_gates_are_numbers(doc: dict[str, Any]):
    doc["gates"] = {GATE: 0}
    assert fused_config_from_dict(doc, ORIGIN).gates == {GATE: 0.0}


@pytest.mark.parametrize(("field", "value"), [
    ("gates", {GATE: None}), ("gates", {GATE: [1]}), ("sources", {"decoder": "x"}),
    ("dtypes", ["a"]),
])
def test_push_and_validate_say_which_field(fused_example: Path, tmp_path: Path, field: str,
                                           value: Any):
    out = tmp_path / "out"
    shutil.copytree(fused_example, out)
    path = out / "fusion_config.json"
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    for args in (("push", str(out), "alice/m", "--dry-run", "--quick"), ("validate", str(out))):
        result = subprocess.run([sys.executable, "-m", "fusesurgery", *args], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, (args, result.stderr)
        assert f"error: {path}: {field}" in result.stderr, (args, result.stderr)
        assert "internal error" not in result.stderr and "Traceback" not in result.stderr
