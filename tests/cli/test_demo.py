import json
import subprocess
import sys

from typer.testing import CliRunner

from fusesurgery.cli.app import app

runner = CliRunner()


def test_demo_reports_bitwise_identity():
    result = runner.invoke(app, ["demo", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["text_only_equal"] and payload["with_image_equal"]
    assert payload["summary"]["fusion_layers"] == [1, 3]
    assert payload["summary"]["is_identity"]
    assert payload["gated_max_abs_diff"] > 0


def test_demo_table_and_bad_option():
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0 and "identity: all gates 0" in result.stdout
    bad = runner.invoke(app, ["demo", "--interval", "0"])
    assert bad.exit_code == 2
    assert "fusion interval must be positive" in bad.stderr
    assert "Traceback" not in bad.output


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "fusesurgery", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fusesurgery 0.1.0"
