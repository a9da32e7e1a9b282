"""The training-step benchmark runs end to end on the tiny preset and reports what its docstring promises."""

import json
import re

import pytest

from .helpers import run_script

SCRIPT = "train_step.py"
NUMBER = r"[0-9.]+(?:e[+-][0-9]+)?"


def test_tiny_run_reports_a_row_per_module_and_the_lm_share_last(capsys, tmp_path):
    # The two cheapest modules, one timed step each, one thread: the test checks the report, not speed.
    arguments = ["--preset", "tiny", "--modules", "pixel_vq", "unified_lm", "--steps", "1", "--repeats", "1",
                 "--warmup", "0", "--threads", "1"]
    report = run_script(SCRIPT, [*arguments, "--json", str(tmp_path / "figures.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("machine:") and "matmul peak" in lines[0]
    # module, batch (the recipes'), trainable M, GFLOP/step, s/step, samples/s, GFLOP/s, share of peak
    for name, batch in (("pixel_vq", 16), ("unified_lm", 32)):
        row = rf"{name}\s+{batch}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}%"
        assert any(re.fullmatch(row, line) for line in lines), name
    assert not any(line.startswith(("siglip_teacher", "tatok", "detok")) for line in lines)
    assert lines[-2] == f"results: {tmp_path / 'figures.json'}"
    share = re.fullmatch(r"LM training step: ([0-9.]+)% of the measured matmul peak", lines[-1])
    assert share and float(share.group(1)) > 0

    assert json.loads((tmp_path / "figures.json").read_text()) == report
    assert set(report["modules"]) == {"pixel_vq", "unified_lm"} and report["machine"]["matmul_peak_gflops"] > 0
    for figures in report["modules"].values():
        assert {"gflop_per_step", "s_per_step", "samples_per_s", "share_of_peak"} <= set(figures)
        assert figures["gflop_per_step"] > 0 and figures["s_per_step"] > 0
        assert figures["samples_per_s"] == pytest.approx(figures["batch"] / figures["s_per_step"])
    assert report["modules"]["unified_lm"]["share_of_peak"] == pytest.approx(float(share.group(1)) / 100, abs=1e-3)
