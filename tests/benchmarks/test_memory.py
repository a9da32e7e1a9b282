"""The memory benchmark runs end to end on the tiny preset and reports what its docstring promises."""

import json
import re

from .helpers import run_script

SCRIPT = "memory.py"


def test_tiny_run_reports_both_precisions_and_the_peaks_last(capsys, tmp_path):
    # One thread: the test checks the report, not speed (see test_tatok_encode).
    arguments = ["--preset", "tiny", "--tokens", "2", "--threads", "1"]
    report = run_script(SCRIPT, [*arguments, "--json", str(tmp_path / "figures.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    for name in ("fp32", "bf16"):
        assert any(re.fullmatch(rf"{name}(\s+[0-9.e+-]+){{5}}", line) for line in lines), name
    peaks = re.fullmatch(r"T2I peak memory at tiny: fp32 ([0-9]+\.[0-9]) GB, bf16 ([0-9]+\.[0-9]) GB", lines[-1])
    assert peaks

    saved = json.loads((tmp_path / "figures.json").read_text())
    assert saved["precisions"] == report["precisions"] and saved["method"] == report["method"]
    fp32, bf16 = report["precisions"]["fp32"], report["precisions"]["bf16"]
    assert fp32["parameters"] == bf16["parameters"] > 0
    assert fp32["weights_bytes"] == 4 * fp32["parameters"] and bf16["weights_bytes"] * 2 == fp32["weights_bytes"]
    # The tiny LM: 4 layers, 2 KV heads of 128 / 4 = 32 dims; keys and values of 729 positions.
    assert fp32["kv_cache_729_bytes_per_row"] == 2 * 4 * 2 * 32 * 729 * 4 == 2 * bf16["kv_cache_729_bytes_per_row"]
    for figures in (fp32, bf16):
        assert figures["build_peak_bytes"] > 0 and figures["generation_peak_bytes"] > 0
        assert [g["cfg"] for g in figures["generation"]] == [1.0, 3.0]
        assert all(g["peak_bytes"] > 0 for g in figures["generation"])
