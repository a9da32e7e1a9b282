"""The TA-Tok encode benchmark runs end to end on the tiny preset and reports what its README promises."""

import re

from .helpers import run_script

SCRIPT = "tatok_encode.py"


def test_tiny_run_reports_three_paths_and_the_ratio_last(capsys, tmp_path):
    # One thread: the test checks the report, not speed, and two threads sharing cores with another job
    # can wait on each other for whole scheduler slices (30x slower on the tiny preset).
    arguments = ["--preset", "tiny", "--repeats", "1", "--warmup", "1", "--threads", "1"]
    report = run_script(SCRIPT, [*arguments, "--json", str(tmp_path / "figures.json")])
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
