"""The diffusion de-tokenizer sampling benchmark runs end to end on the tiny preset and reports what its docstring
says."""

import json
import re

from .helpers import run_script

SCRIPT = "diffusion_detok_sample.py"
ROW_KEYS = {
    "batch", "cfg", "steps", "same_seed_agreement", "finite", "images_per_s", "s_per_step", "s_per_call", "times_s",
}


def test_tiny_run_reports_every_row_determinism_and_the_headline_last(capsys, tmp_path):
    # One thread: the test checks the report, not speed. One and two steps instead of the preset's 5/10/20.
    arguments = ["--preset", "tiny", "--steps", "1", "2", "--batches", "1", "2", "--cfg", "1", "3"]
    arguments += ["--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(tmp_path / "figures.json")]
    report = run_script(SCRIPT, arguments)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("machine: ") and lines[1].startswith("model: tiny, ")
    assert re.fullmatch(r"batch\s+cfg\s+steps\s+s/call\s+s/step\s+images/s", lines[2])
    table = lines[3:-3]
    expected = [(batch, cfg, steps) for batch in "12" for cfg in "13" for steps in "12"]
    assert [tuple(line.split()[:3]) for line in table] == expected
    assert all(re.fullmatch(r"\d+\s+\d+\s+\d+(\s+[0-9.e+-]+){3}", line) for line in table)
    # Flow-matching Euler steps draw no noise after the first sample: the same seed gives the same pixels.
    assert lines[-3] == "sanity: same-seed images agree on 1.000000 of pixels (1.0 expected), all finite: True"
    assert lines[-2] == f"results: {tmp_path / 'figures.json'}"
    # The tiny preset's default (20 steps) is not measured here, so the headline is at the most steps measured.
    headline = re.fullmatch(r"diffusion images/s at (\d+) steps, batch (\d+): ([0-9.e+]+)", lines[-1])
    assert headline and headline.group(1, 2) == ("2", "2") and float(headline.group(3)) > 0
    written = json.loads((tmp_path / "figures.json").read_text())
    assert set(written) == {"benchmark", "preset", "machine", "default_steps", "headline", "rows"}
    assert written["default_steps"] == 20 and written["headline"] == report["headline"]
    assert (written["headline"]["steps"], written["headline"]["batch"], written["headline"]["cfg"]) == (2, 2, 1.0)
    assert len(written["rows"]) == 8 and all(set(row) == ROW_KEYS for row in written["rows"])
    assert all(row["same_seed_agreement"] == 1.0 and row["finite"] for row in written["rows"])
