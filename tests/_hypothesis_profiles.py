"""Hypothesis settings profiles for the property tests (tests/test_properties.py) and
the fuzz target (tests/fuzz_api.py), chosen with HYPOTHESIS_PROFILE:

- ci (default): a fixed number of examples per property, derandomized (the same
  examples on every run, so CI is reproducible), no deadline (2 shared cores and
  the sanitizer build make timings meaningless); the file runs in about a minute.
- dev: more examples, random each run (what a local run should use while editing).
- long: many more examples, for a local soak (several minutes per property).
- fuzz, fuzz_replay: set by tests/fuzz_api.py.
"""
import os

from hypothesis import HealthCheck, Verbosity, settings

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("ci", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=300, **_COMMON)
settings.register_profile("long", max_examples=5000, **_COMMON)
# tests/fuzz_api.py: random examples from the seed it gives, no example database (so
# a seed always replays the same examples); fuzz_replay prints each example first.
settings.register_profile("fuzz", max_examples=50, database=None, **_COMMON)
settings.register_profile("fuzz_replay", parent=settings.get_profile("fuzz"),
                          verbosity=Verbosity.verbose)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
