"""The TA-Tok encode benchmark runs end to end on the tiny preset and reports what its README promises."""

import importlib.util
import re
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tatok_encode.py"


def load_benchmark():
    # benchmarks/ is a folder of scripts, not a package, so the script is imported from its path.
    spec = importlib.util.spec_from_file_location("tatok_encode_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_three_paths_and_the_ratio_last(capsys, tmp_path):
    benchmark = load_benchmark()
    threads = torch.get_num_threads()
    try:
        # One thread: the test checks the report, not speed, and two threads sharing cores with another job
        # can wait on each other for whole scheduler slices (30x slower on the tiny preset).
        arguments = ["--preset", "tiny", "--repeats", "1", "--warmup", "1", "--threads", "1"]
        report = benchmark.main([*arguments, "--json", str(tmp_path / "figures.json")])
    finally:
        torch.set_num_threads(threads)  # main sets the process-wide thread count; later tests expect theirs
    lines = capsys.readouterr().out.strip().splitlines()
    for path in ("tarkit", "baseline", "tower"):
        assert any(re.match(rf"{path}\s+median [0-9.]+ s/batch\s+[0-9.e+]+ images/s", line) for line in lines), path
    assert "tarkit time / tower-alone time" in lines[-2]
    ratio = re.fullmatch(r"tarkit/baseline throughput ratio: ([0-9.]+)x", lines[-1])
    assert ratio and float(ratio.group(1)) > 0
    # Equal precision: tarkit's deterministic search picks exactly the argmax of the baseline's cosine matrix.
    assert report["agreement"] == 1.0
    assert any(line.startswith("sanity:") and "1.000000 of tokens" in line for line in lines)
    assert (tmp_path / "figures.json").is_file() and set(report["paths"]) == {"tarkit", "baseline", "tower"}
    assert set(report["peak_memory_bytes"]) == {"tarkit", "baseline", "tower"}
    assert all(isinstance(v, int) and v >= 0 for v in report["peak_memory_bytes"].values())
    assert any(line.startswith("peak memory above the model: tarkit ") for line in lines)
