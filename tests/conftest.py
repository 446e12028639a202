"""Test session setup: 8 simulated CPU devices for the sharding tests."""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Parity tests compare against float64 references: on a GPU, float32 matrix
# products would otherwise run in TF32 (10-bit mantissas).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
