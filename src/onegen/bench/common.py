"""Shared pieces of the benchmarks: machine description, hardware peaks, timing, memory, output files.

Peaks: on CUDA the dense bf16/fp16 tensor-core FLOP/s and HBM bandwidth of the card from its spec
sheet (known cards) or else measured; on CPU both are measured here (a large fp32 matmul, a large
copy), so MFU on CPU means "fraction of what this machine's matmul reaches", not a vendor number.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..device import device_arg

# name fragment -> (dense bf16 FLOP/s, HBM bytes/s), from the vendors' spec sheets (SXM parts)
# Spec sheets (dense bf16 FLOP/s, HBM bytes/s), quoted beside the measured numbers; more specific names first.
GPU_PEAKS = {"H200": (989e12, 4.8e12), "H100 PCIe": (756e12, 2.0e12), "H100 NVL": (835e12, 3.9e12),
             "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12), "L40S": (362e12, 0.864e12),
             "A10G": (125e12, 0.6e12)}


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int, device: str | torch.device, warmup: int = 1,
                best: bool = False) -> float:
    """Median (or with `best` the shortest) wall time (s) of `fn()` over `repeats` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0] if best else times[len(times) // 2]


def _gpu_spec(device: str | torch.device) -> tuple[float, float] | None:
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in GPU_PEAKS.items() if k in name), None)


def _spec_note(device: str | torch.device, which: int, unit: float, name: str) -> str:
    spec = _gpu_spec(device) if torch.device(device).type == "cuda" else None
    return f" (spec sheet: {spec[which] / unit:.3g} {name})" if spec else ""


def peak_flops(device: str | torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where the number comes from): a large matmul measured on the device in hand (the card's
    real ceiling, as the issue's 785 TFLOP/s on the H200; the spec sheet is quoted beside it)."""
    n = 2048 if torch.device(device).type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, 5, device, best=True)
    note = _spec_note(device, 0, 1e12, "TFLOP/s dense bf16")
    return 2 * n ** 3 / t, f"measured {n}x{n} {str(dtype).replace('torch.', '')} matmul{note}"


def memory_bandwidth(device: str | torch.device) -> tuple[float, str]:
    """(bytes/s, where the number comes from): a large copy measured on the device in hand (read + write;
    the H200 gives about 4.3 TB/s, the issue's figure; the spec sheet is quoted beside it)."""
    n = (64 << 20) if torch.device(device).type == "cpu" else (256 << 20)  # 256 MB / 1 GiB of float32
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), 5, device, best=True)
    note = _spec_note(device, 1, 1e12, "TB/s HBM")
    return 2 * src.numel() * 4 / t, f"measured {n * 4 >> 20} MB copy (read + write){note}"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


class PeakHeap:
    """Peak CPU heap in use while the `with` block runs, sampled every `interval` s from another thread.

    Reads glibc's `mallinfo2` (bytes handed out by malloc, all arenas, mmapped blocks included), so
    memory freed and cached by the allocator does not count; falls back to the resident set size
    where glibc is not there. Approximate (sampling can miss a very short peak). `growth` is the
    peak minus what was in use at entry.
    """

    def __init__(self, interval: float = 0.001):
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()
        try:
            self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
            self._mallinfo2.restype = _MallInfo2
            self.source = "glibc mallinfo2 (heap in use)"
        except (OSError, AttributeError):
            self._mallinfo2 = None
            self.source = "resident set size"

    def _now(self) -> int:
        if self._mallinfo2 is not None:
            info = self._mallinfo2()
            return info.uordblks + info.hblkhd
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now())
            time.sleep(self.interval)

    def __enter__(self) -> PeakHeap:
        self.start = self.peak = self._now()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def machine(device: str) -> dict[str, Any]:
    """What ran the benchmark: versions, CPU/GPU, threads, date."""
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info



def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu (CPU-sized defaults) or cuda (GPU sizes)")
    p.add_argument("--out", default="benchmarks/results", help="where the JSON and PNG go")
    p.add_argument("--seed", type=int, default=0)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A fixed-width text table: columns are (key, header, format spec)."""
    widths = [max(len(h), 9) for _, h, _ in columns]
    lines = ["  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True))]
    for r in rows:
        cells = [format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns]
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def write_partial(result: dict[str, Any], out: str | Path, name: str) -> None:
    """`<out>/<name>.json` now (atomic), with `partial: true`: a run stopped by a time limit keeps what it
    measured; `write_outputs` writes the final one."""
    from ..io import write_json_atomic

    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / f"{name}.json", {**result, "partial": True})


def write_outputs(result: dict[str, Any], out: str | Path, name: str,
                  plot: Callable[[dict[str, Any]], Any]) -> None:
    """`<out>/<name>.json` and `<out>/<name>.png` (both atomic); `plot` returns a matplotlib figure."""
    from ..io import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot(result)
    fig.tight_layout()
    tmp = out / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out / f"{name}.png")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")
