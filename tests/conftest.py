"""Tests run on 8 fake CPU devices; these variables must be set before jax is imported."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Ahead-of-time TPU compiles load libtpu in several test processes at once (compile only).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# A local Cloud Storage emulator for gs:// tests (tests/gcs.py), started on first use.
from gcs import gcs_bucket, gcs_emulator  # noqa: E402, F401
