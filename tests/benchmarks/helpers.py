"""What the benchmark tests share: importing a script from ``benchmarks/`` (a folder of scripts, not a package,
so each is imported from its path) and running its ``main`` without leaking the thread count it sets."""

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{Path(script).stem}", BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script: str, arguments: list[str]) -> dict[str, Any]:
    """``main(arguments)`` of ``benchmarks/<script>``; torch's thread count is restored afterwards, since a
    benchmark sets the process-wide count and later tests expect theirs."""
    threads = torch.get_num_threads()
    try:
        return load_script(script).main(arguments)
    finally:
        torch.set_num_threads(threads)
