"""What the benchmarks share: the machine's facts and limits measured in the same run, interleaved timing, and
the results file ``benchmarks/results/<name>.json``.

The limits are measured, not quoted from a data sheet, so that a ratio to them means the same thing on a shared
or throttled machine: the matmul peak is the best of a few large square matmuls at the benchmark's precision,
the read bandwidth the fastest of a few streaming reads of a matrix far larger than the caches (a sum, a gemv and
a two-column product each read every byte once and do at most 4 FLOP per 4 bytes, so memory is their limit).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tarkit.cpu_linear import cpu_linear

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_common_arguments(parser: argparse.ArgumentParser, presets: list[str], default_preset: str) -> None:
    """``--preset --device --dtype --threads --repeats --warmup --seed --json``, the same in every script."""
    parser.add_argument("--preset", choices=presets, default=default_preset)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per path first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="results file (default: benchmarks/results/<name>.json)")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here; run on cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(
    paths: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str | torch.device = "cpu"
) -> dict[str, list[float]]:
    """Seconds of each call of each path, the paths taking turns in every repeat so that load from other
    processes falls on all of them alike."""
    for _ in range(warmup):
        for fn in paths.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            times[name].append(timed(fn, device))
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)


def matmul_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048) -> dict[str, float]:
    """FLOP/s of the best of five ``[size, size]`` products through each kernel family: ``torch.mm`` (on CPU
    MKL, which on AMD CPUs runs its AVX2 code) and :func:`tarkit.cpu_linear.cpu_linear` (on CPU in fp32
    oneDNN); ``"peak"`` is the faster, the machine's limit that shares of peak are taken against."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    rates = {}
    for name, product in (("torch.mm", lambda: a @ b), ("cpu_linear", lambda: cpu_linear(a, b))):
        product()
        rates[name] = 2 * size**3 / min(timed(product, device) for _ in range(5))
    return {**rates, "peak": max(rates.values())}


def read_bandwidth(device: str = "cpu", mib: int = 256) -> float:
    """Bytes/s of the fastest of four reads of a ``mib``-MiB fp32 matrix, each the best of five: a sum, a
    matrix-vector product, a product with two columns (on some CPUs the BLAS gemv streams at half the rate its
    two-column GEMM does, so the gemv alone would put the floor too low) and the vector's product through
    :func:`tarkit.cpu_linear.cpu_linear`."""
    columns = 4096
    rows = mib * 2**20 // (4 * columns)
    matrix = torch.randn(rows, columns, device=device)
    vector, pair = torch.randn(columns, device=device), torch.randn(2, columns, device=device).t()
    reads = (matrix.sum, lambda: matrix @ vector, lambda: torch.mm(matrix, pair), lambda: cpu_linear(vector, matrix))
    best = min(timed(read, device) for read in reads for _ in range(5))
    return matrix.numel() * 4 / best


CLEAR_REFS, STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{STATUS} has no {field}")


def _max_rss() -> int:
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class PeakMemory:
    """The most bytes held during a phase: resident memory on the CPU, allocated tensors on CUDA."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        else:
            try:
                CLEAR_REFS.write_text("5")
                _status_bytes("VmHWM")
                self.method = "VmHWM"
            except OSError:
                self.method = "ru_maxrss"

    def start(self) -> int:
        """Begin a phase: give freed memory back, reset the peak to what is held now, and return that."""
        gc.collect()
        if self.method == "torch.cuda.max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: freed pages the allocator keeps stay counted, so peaks read high
        if self.method == "VmHWM":
            CLEAR_REFS.write_text("5")
            return _status_bytes("VmRSS")
        return _max_rss()

    def peak(self) -> int:
        if self.method == "torch.cuda.max_memory_allocated":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_bytes("VmHWM") if self.method == "VmHWM" else _max_rss()


def peak_memory_increase(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Bytes the peak memory rises above what is held just before ``fn`` runs (see :class:`PeakMemory`)."""
    memory = PeakMemory(str(device))
    before = memory.start()
    fn()
    return max(0, memory.peak() - before)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """What the figures were measured on, with its matmul peak and read bandwidth measured now."""
    facts: dict[str, Any] = {
        "device": device,
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if torch.device(device).type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    rates = matmul_peak_flops(device, dtype)
    facts["matmul_peak_gflops"] = rates.pop("peak") / 1e9
    facts["matmul_kernels_gflops"] = {name: rate / 1e9 for name, rate in rates.items()}
    facts["read_bandwidth_gbs"] = read_bandwidth(device) / 1e9
    return facts


def machine_line(facts: dict[str, Any]) -> str:
    """The first line every benchmark prints: what it ran on and the limits measured in the run."""
    return (
        f"machine: {facts['cpu']}, {facts['threads']} threads, torch {facts['torch']}, {facts['dtype']}; "
        f"matmul peak {facts['matmul_peak_gflops']:.0f} GFLOP/s, read {facts['read_bandwidth_gbs']:.1f} GB/s"
    )


def write_results(payload: dict[str, Any], args: argparse.Namespace) -> Path:
    """``payload`` as JSON at ``args.json``, by default ``benchmarks/results/<benchmark>_<preset>[_<dtype>]_<device>
    .json`` (the dtype where the script takes one), and its ``results:`` line."""
    parts = [payload["benchmark"], args.preset, getattr(args, "dtype", None), args.device]
    target = Path(args.json) if args.json else RESULTS / f"{'_'.join(p for p in parts if p)}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {target}")
    return target


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    """A small aligned table on stdout."""
    cells = [header, *[[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
