"""Settings and fixtures for the whole suite."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# No per-example deadline and no "too slow" health check: this suite runs on shared VMs that
# stall for seconds now and then, and a stall says nothing about the code under test.
# (Timings are benchmarks/' business.)
settings.register_profile(
    "fusesurgery", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("fusesurgery")


@pytest.fixture(scope="session")
def fused_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled examples fused (a fusion layer every 2nd decoder layer), built once per run;
    shared: a test that changes it must work on a copy."""
    import fusesurgery

    examples = Path(__file__).resolve().parents[1] / "examples"
    out = tmp_path_factory.mktemp("fused_example") / "fused"
    fusesurgery.fuse(examples / "tiny-clip-vision", examples / "tiny-llama", out, every=2)
    return out
