"""The scaling benchmark runs end to end on the tiny preset and reports what its docstring promises."""

import json
import re

from .helpers import run_script

SCRIPT = "scaling.py"


def test_tiny_run_reports_three_scales_a_plot_and_the_ratios_last(capsys, tmp_path):
    # One thread: the test checks the report, not speed (see test_tatok_encode). Four T2I tokens per image
    # exercise the extrapolation to 729/169/81.
    arguments = ["--preset", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1",
                 "--t2i-tokens-measured", "4", "--answer-tokens", "2"]
    report = run_script(SCRIPT, [*arguments, "--json", str(tmp_path / "figures.json"),
                             "--plot", str(tmp_path / "scaling.png")])
    lines = capsys.readouterr().out.strip().splitlines()
    number = r"[0-9.e+-]+"
    for count in (729, 169, 81):
        row = rf"{count}\s+{number}\s+4 tokens\s+[0-9]+\s+{number}\s+{number}"
        assert any(re.fullmatch(row, line) for line in lines), count
    ratios = re.fullmatch(r"T2I cost 729 vs 81 tokens: ([0-9.]+)x; I2T time to first token: ([0-9.]+)x", lines[-1])
    assert ratios and float(ratios.group(1)) > 0 and float(ratios.group(2)) > 0
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads((tmp_path / "figures.json").read_text())
    assert {"rows", "times_s", "t2i_ratio", "ttft_ratio", "answer_ratio", "machine"} <= set(saved)
    rows = {r["image_tokens"]: r for r in saved["rows"]}
    assert set(rows) == {729, 169, 81} and saved["rows"] == report["rows"]
    assert [rows[n]["scale_index"] for n in (729, 169, 81)] == [0, 1, 2]
    for n, row in rows.items():
        assert row["t2i_tokens_measured"] == 4 and row["answer_tokens"] == 2
        assert row["t2i_s_per_image"] == row["t2i_s_per_token"] * n
        assert row["i2t_ttft_s"] > 0 and row["i2t_answer_s"] > 0
    # The I2T prompts differ by their image tokens only.
    assert rows[729]["i2t_prompt_tokens"] - rows[81]["i2t_prompt_tokens"] == 729 - 81
