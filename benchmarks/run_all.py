"""``make bench``: every benchmark at the sizes a 2-core CPU runs in about ten minutes, one after another, then a
summary of each one's last line (its ratio or headline figure). Results land in ``benchmarks/results/``.

Usage: ``python benchmarks/run_all.py [--device cpu|cuda] [--only NAME ...] [--list]``. On a GPU the larger
presets run too (``GPU_EXTRA``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, script, arguments): the CPU suite. Each row is one run of one script; tokens and repeats are cut where
# a full-size call would take minutes (the scripts say so in their tables).
CPU_SUITE: list[tuple[str, str, list[str]]] = [
    ("t2i_generate small", "t2i_generate.py", ["--preset", "small", "--repeats", "2"]),
    ("t2i_generate 0.5b", "t2i_generate.py", ["--preset", "0.5b", "--tokens", "16", "--repeats", "1"]),
    ("t2i_generate small bf16", "t2i_generate.py", ["--preset", "small", "--dtype", "bfloat16", "--repeats", "2"]),
    ("i2t_answer small", "i2t_answer.py", ["--preset", "small", "--repeats", "2"]),
    ("i2t_answer 0.5b", "i2t_answer.py", ["--preset", "0.5b", "--tokens", "24", "--repeats", "2"]),
    ("ar_detok_sample tiny", "ar_detok_sample.py", ["--preset", "tiny", "--repeats", "3"]),
    ("ar_detok_sample base", "ar_detok_sample.py", ["--preset", "base", "--repeats", "1", "--warmup", "0"]),
    ("diffusion_detok_sample tiny", "diffusion_detok_sample.py", ["--preset", "tiny", "--repeats", "2"]),
    ("tatok_encode tiny", "tatok_encode.py", ["--preset", "tiny", "--repeats", "5"]),
    ("tatok_encode paper", "tatok_encode.py", ["--preset", "paper", "--repeats", "1", "--warmup", "0"]),
    ("scaling small", "scaling.py", ["--preset", "small", "--repeats", "1"]),
    ("memory qwen2.5-1.5b", "memory.py", ["--preset", "qwen2.5-1.5b", "--tokens", "2"]),
    ("train_step tiny", "train_step.py", ["--preset", "tiny", "--repeats", "2"]),
    ("train_step small", "train_step.py", ["--preset", "small", "--repeats", "1", "--warmup", "0"]),
]
# What a GPU runs on top: the full-size rows the CPU suite cuts.
GPU_EXTRA: list[tuple[str, str, list[str]]] = [
    ("t2i_generate 0.5b full", "t2i_generate.py", ["--preset", "0.5b", "--tokens", "256", "--repeats", "3"]),
    ("diffusion_detok_sample base", "diffusion_detok_sample.py", ["--preset", "base", "--repeats", "2"]),
    ("t2i_generate 0.5b bf16", "t2i_generate.py", ["--preset", "0.5b", "--dtype", "bfloat16", "--repeats", "3"]),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="+", default=None, help="run only the rows whose name starts with these")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suite = CPU_SUITE + (GPU_EXTRA if args.device.startswith("cuda") else [])
    if args.only:
        suite = [row for row in suite if any(row[0].startswith(prefix) for prefix in args.only)]
    if args.list:
        for name, script, arguments in suite:
            print(f"{name}: {script} {' '.join(arguments)}")
        return 0
    summary, failed = [], 0
    for name, script, arguments in suite:
        command = [sys.executable, str(HERE / script), *arguments, "--device", args.device]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(run.stdout, end="", flush=True)
        if run.returncode:
            failed += 1
            last = f"FAILED (exit {run.returncode}): {run.stderr.strip().splitlines()[-1] if run.stderr else ''}"
            print(run.stderr, end="", file=sys.stderr)
        else:
            last = run.stdout.strip().splitlines()[-1]
        summary.append(f"{name} ({seconds:.0f} s): {last}")
    print("== summary")
    for line in summary:
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
