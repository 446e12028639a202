"""Test session setup: 8 simulated CPU devices, full-precision float32
products, and the fast tier's slow marks."""

import json
import os
import pathlib

import pytest

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Parity tests compare against float64 references: on a GPU, float32 matrix
# products would otherwise run in TF32 (10-bit mantissas).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


# The fast tier (python -m pytest -m "not slow") leaves out what took longer
# than this on a 2-core machine in the recorded full run (tests/durations.py
# refreshes the record); tests may also be marked slow by hand, and tests
# marked `fast_tier` stay in it whatever they took.
SLOW_SECONDS = 0.8
_DURATIONS = pathlib.Path(__file__).with_name("durations.json")


def pytest_collection_modifyitems(config, items):
  recorded = json.loads(_DURATIONS.read_text()) if _DURATIONS.exists() else {}
  slow = pytest.mark.slow
  for item in items:
    if (recorded.get(item.nodeid, 0.0) > SLOW_SECONDS
        and item.get_closest_marker("fast_tier") is None):
      item.add_marker(slow)
