"""One module per newer `tpustack` subcommand, found by name: no shared file to edit to add one.

Each module `tpustack/commands/<name>.py` defines
    HELP: str                      the one-line help
    add_arguments(parser) -> None  argparse only (importing the module must not load jax)
    run(args) -> int               the command; imports what it needs, raises UserError for bad input
and its subcommand is `<name>` with underscores as dashes (bench_serve -> `bench-serve`).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def command_modules() -> dict[str, ModuleType]:
    """{subcommand name: module} for every module in this package."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            found[info.name.replace("_", "-")] = importlib.import_module(f"{__name__}.{info.name}")
    return found
