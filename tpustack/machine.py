"""The machine a figure was measured on: every benchmark result names it (DESIGN.md,
benchmarking), since figures from different CPUs do not compare."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_description() -> str:
    """The CPU's model name and core count: 'Intel(R) Xeon(R) Processor (2 cores)'."""
    return f"{cpu_model()} ({os.cpu_count()} cores)"
