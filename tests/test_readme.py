"""The README's two quick-start commands stay true: CI runs the test command verbatim."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_start_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)?\n(.*?)\n```", section, re.S)


def test_exactly_two_quick_start_commands():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main_job, tests = commands
    assert main_job.endswith("tpustack train")  # the main job on its built-in default
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    tests = quick_start_commands()[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert tests in ci
