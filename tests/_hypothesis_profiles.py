"""Hypothesis settings profiles for the property tests (tests/test_properties.py) and
the fuzz target (tests/fuzz_api.py), chosen with HYPOTHESIS_PROFILE:

- ci (default): a fixed number of examples per property, derandomized (the same
  examples on every run, so CI is reproducible), no deadline (2 shared cores and
  the sanitizer build make timings meaningless); the file runs in about a minute.
- dev: more examples, random each run (what a local run should use while editing).
- long: many more examples, for a local soak (several minutes per property).
"""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("ci", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=300, **_COMMON)
settings.register_profile("long", max_examples=5000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
