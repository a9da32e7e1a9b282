"""``make bench`` runs every benchmark script, each with arguments its own parser accepts."""

import importlib.util
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_runner():
    spec = importlib.util.spec_from_file_location("run_all_benchmarks", BENCHMARKS / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_suite_covers_every_benchmark_script():
    runner = load_runner()
    scripts = {path.name for path in BENCHMARKS.glob("*.py")} - {"common.py", "run_all.py"}
    assert {script for _, script, _ in runner.CPU_SUITE} == scripts


def test_every_row_parses_with_its_script():
    """A typo'd flag in the suite would only show after minutes of ``make bench``: each script's parser checks it."""
    runner = load_runner()
    threads = torch.get_num_threads()
    try:
        for name, script, arguments in runner.CPU_SUITE + runner.GPU_EXTRA:
            spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCHMARKS / script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            try:
                module.parse_args([*arguments, "--device", "cpu"])
            except SystemExit as error:
                raise AssertionError(f"{name}: {script} rejects {arguments}") from error
    finally:
        torch.set_num_threads(threads)  # a parser may set the thread count
