"""``import fusesurgery`` registers the exported model's classes with transformers' Auto classes
without importing transformers: an export loads with transformers' own calls and no
``trust_remote_code``, whichever of the two is imported first (each order in a fresh process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")

OURS = "fusesurgery.hf.template."

# Prints one JSON line: the classes transformers' Auto classes load DIR as, without
# trust_remote_code, and what the process had imported at each point.
LOAD = """
import json, sys
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
config = AutoConfig.from_pretrained(DIR)
model = AutoModelForImageTextToText.from_pretrained(DIR)
processor = AutoProcessor.from_pretrained(DIR)
seen["config"] = type(config).__module__
seen["model"] = type(model).__module__
seen["processor"] = type(processor).__module__
seen["finders"] = [type(f).__name__ for f in sys.meta_path]
"""


def _run(script: str, directory: Path) -> dict:
    code = f"DIR = {str(directory)!r}\nseen = {{}}\n" + textwrap.dedent(script) + LOAD + (
        "print(json.dumps(seen))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "error::ImportWarning"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_ours(seen: dict) -> None:
    for part in ("config", "model", "processor"):
        assert seen[part].startswith(OURS), seen
    assert "AutoRegisteringFinder" not in seen["finders"]  # it left once all were registered


def test_fusesurgery_first_then_transformers(zero_export):
    seen = _run("""
        import sys
        import fusesurgery
        seen["transformers_at_import"] = "transformers" in sys.modules
        # nor what the hook's plain classes avoid (importlib.abc imports importlib.resources)
        seen["imported"] = [m for m in ("importlib.resources", "threading") if m in sys.modules]
        import transformers
        seen["torch_after_import_transformers"] = "torch" in sys.modules
        """, zero_export)
    assert seen["transformers_at_import"] is False
    assert seen["imported"] == []
    assert seen["torch_after_import_transformers"] is False
    _assert_ours(seen)


def test_transformers_auto_classes_first_then_fusesurgery(zero_export):
    seen = _run("""
        from transformers import AutoModelForImageTextToText, AutoProcessor
        import fusesurgery
        """, zero_export)
    _assert_ours(seen)


def test_plain_transformers_first_then_fusesurgery(zero_export):
    # transformers imported, its auto modules not yet: the finder registers when they are
    seen = _run("""
        import sys
        import transformers
        import fusesurgery
        seen["auto_before"] = "transformers.models.auto.configuration_auto" in sys.modules
        """, zero_export)
    assert seen["auto_before"] is False
    _assert_ours(seen)


def test_our_template_module_imported_first(zero_export):
    # its import is what imports transformers: registering must wait until it is complete
    # (the subprocess turns the warning of a failed registration into an error)
    seen = _run("""
        from fusesurgery.hf.template import modeling_fusesurgery_fused
        """, zero_export)
    _assert_ours(seen)


def test_registered_classes_win_over_remote_code_as_transformers_rules(zero_export):
    # transformers prefers an explicitly registered class to the directory's code, even with
    # trust_remote_code=True; the files are the same code (the export copies the template)
    from transformers import AutoModelForImageTextToText

    import fusesurgery

    fusesurgery.register_transformers()
    model = AutoModelForImageTextToText.from_pretrained(zero_export, trust_remote_code=True)
    assert type(model).__module__.startswith(OURS)
    template = Path(fusesurgery.__file__).parent / "hf" / "template"
    for name in ("modeling_fusesurgery_fused.py", "configuration_fusesurgery_fused.py"):
        assert (zero_export / name).read_bytes() == (template / name).read_bytes()


def test_opting_out_loads_the_directory_own_code_files(zero_export):
    code = textwrap.dedent(f"""
        import json, sys
        import fusesurgery
        from transformers import AutoConfig, AutoModelForImageTextToText
        config = AutoConfig.from_pretrained({str(zero_export)!r}, trust_remote_code=True)
        try:
            AutoConfig.from_pretrained({str(zero_export)!r}, trust_remote_code=False)
            refused = False
        except ValueError:
            refused = True
        print(json.dumps([type(config).__module__, refused,
                          any(type(f).__name__ == "AutoRegisteringFinder" for f in sys.meta_path)]))
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "FUSESURGERY_NO_AUTO_REGISTER": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    module, refused, finder = json.loads(done.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules.") and refused and not finder


def test_the_finder_answers_only_for_transformers():
    from fusesurgery.hf.autoregister import AutoRegisteringFinder

    finder = AutoRegisteringFinder()
    assert finder.find_spec("json", None) is None
    assert finder.find_spec("transformers_modules.x", None) is None
    import transformers.models.auto

    spec = finder.find_spec("transformers.models.auto.configuration_auto",
                            transformers.models.auto.__path__)
    assert type(spec.loader).__name__ == "_RegisteringLoader"
    assert spec.loader.get_filename("transformers.models.auto.configuration_auto") == spec.origin
