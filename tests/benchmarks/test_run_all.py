"""``make bench`` runs every benchmark script, each with arguments its own parser accepts."""

import torch

from .helpers import BENCHMARKS, load_script


def test_the_suite_covers_every_benchmark_script():
    runner = load_script("run_all.py")
    scripts = {path.name for path in BENCHMARKS.glob("*.py")} - {"common.py", "run_all.py"}
    assert {script for _, script, _ in runner.CPU_SUITE} == scripts


def test_every_row_parses_with_its_script():
    """A typo'd flag in the suite would only show after minutes of ``make bench``: each script's parser checks it."""
    runner = load_script("run_all.py")
    threads = torch.get_num_threads()
    try:
        for name, script, arguments in runner.CPU_SUITE + runner.GPU_EXTRA:
            try:
                load_script(script).parse_args([*arguments, "--device", "cpu"])
            except SystemExit as error:
                raise AssertionError(f"{name}: {script} rejects {arguments}") from error
    finally:
        torch.set_num_threads(threads)  # a parser may set the thread count
