"""Settings for the whole suite."""

from hypothesis import HealthCheck, settings

# No per-example deadline and no "too slow" health check: this suite runs on shared VMs that
# stall for seconds now and then, and a stall says nothing about the code under test.
# (Timings are benchmarks/' business.)
settings.register_profile(
    "fusesurgery", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("fusesurgery")
