"""The AR de-tokenizer sampling benchmark runs end to end on the tiny preset and reports what its docstring says."""

import json
import re

from .helpers import run_script

SCRIPT = "ar_detok_sample.py"
ROW_KEYS = {
    "batch", "cfg", "codes", "greedy_agreement", "tarkit_codes_per_s", "llamagen_codes_per_s", "tarkit_ms_per_step",
    "llamagen_ms_per_step", "speedup", "times_s",
}


def test_tiny_run_reports_both_loops_greedy_agreement_and_the_ratio_last(capsys, tmp_path):
    # One thread: the test checks the report, not speed. One batch size; both guidance scales, since cfg 3 is
    # the doubled batch. Top-k and top-p on, so that LlamaGen's filter runs too (greedy decoding skips it).
    arguments = ["--preset", "tiny", "--batches", "1", "--cfg", "1", "3", "--top-k", "20", "--top-p", "0.9"]
    arguments += ["--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(tmp_path / "figures.json")]
    report = run_script(SCRIPT, arguments)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("machine: ") and lines[1].startswith("model: tiny, ")
    assert re.match(r"batch\s+cfg\s+tarkit codes/s\s+llamagen codes/s\s+tarkit ms/step\s+llamagen ms/step", lines[2])
    for cfg in ("1", "3"):
        number = r"[0-9.e+]+"
        assert any(re.fullmatch(rf"1\s+{cfg}(\s+{number}){{4}}\s+{number}x\s+1\.000", line) for line in lines), cfg
    # Equal weights and equal arithmetic up to rounding: greedy decoding picks the same code at every step.
    assert lines[-3] == "sanity: greedy codes agree on 1.000000 of codes (1.0 expected)"
    assert [row["greedy_agreement"] for row in report["rows"]] == [1.0, 1.0]
    assert lines[-2] == f"results: {tmp_path / 'figures.json'}"
    ratio = re.fullmatch(r"tarkit/llamagen speed ratio \(lowest row\): ([0-9.]+)x", lines[-1])
    assert ratio and float(ratio.group(1)) > 0
    written = json.loads((tmp_path / "figures.json").read_text())
    assert set(written) == {"benchmark", "preset", "machine", "sampling", "rows"} and written["preset"] == "tiny"
    assert written["sampling"] == {"temperature": 1.0, "top_k": 20, "top_p": 0.9}
    assert [(row["batch"], row["cfg"]) for row in written["rows"]] == [(1, 1.0), (1, 3.0)]
    assert all(set(row) == ROW_KEYS and row["codes"] == 256 for row in written["rows"])
