"""Tests run on 8 fake CPU devices; these variables must be set before jax is imported."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Ahead-of-time TPU compiles load libtpu in several test processes at once (compile only).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One persistent compilation cache for every test process and the CLI processes they start
# (train, resume, eval, generate and launcher runs compile the same few programs again and
# again: a cached run takes about a third of the time on 2 cores). Bounded, LRU-evicted.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tpustack-tests-jax-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# A local Cloud Storage emulator for gs:// tests (tests/gcs.py), started on first use.
from gcs import gcs_bucket, gcs_emulator  # noqa: E402, F401
