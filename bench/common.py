"""What every benchmark here shares: the machine's description, timing, results as JSON lines.

The machines these run on are shared and their speed drifts, so a benchmark never reports an
absolute time alone: each figure comes with a ratio against a baseline measured in the same
process, and the measurements of the things compared are interleaved in rounds so a slow
minute hits both. Every result line carries the machine, the versions and the settings, so a
line read alone still says what it measured.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repo
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

RESULTS_DIR = REPO_ROOT / "bench" / "results"
SHAKESPEARE = REPO_ROOT / "data" / "samples" / "tinyshakespeare.txt"


# ---------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The CPU, cores, accelerator, versions and load: what a reader needs to compare two runs."""
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{properties.major}.{properties.minor}"
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    """Wait for queued GPU work, so a timer read after it measures the work, not the launch."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------------- peak FLOPs
def peak_matmul_flops(dtype, size: int, reps: int = 5) -> float:
    """Best-of-`reps` FLOP/s of one (size x size) @ (size x size) matmul in `dtype` on this device.

    The ceiling MFU is measured against: what this machine's BLAS (or cuBLAS) reaches on a large,
    square, well-shaped matmul right now, with the same threads the training loop uses. Not the
    vendor's datasheet peak, which a shared 2-core VM never sees.
    """
    import torch

    where = device()
    a = torch.randn(size, size, device=where).to(dtype)
    b = torch.randn(size, size, device=where).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernel selection
    synchronize()
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize()
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


# ---------------------------------------------------------------------------------- results
class Reporter:
    """Writes one JSON object per measurement to stdout and appends it to a .jsonl file."""

    def __init__(self, benchmark: str, out: str | Path | None, settings: dict[str, Any]):
        self.benchmark = benchmark
        self.out = Path(out) if out else RESULTS_DIR / f"{benchmark}.jsonl"
        self.settings = settings
        self.machine = machine_info()
        self.run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    def header(self) -> None:
        print(f"== {self.benchmark}  run {self.run_id}")
        print("machine: " + ", ".join(f"{k}={v}" for k, v in self.machine.items()))
        print("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        sys.stdout.flush()

    def emit(self, measurement: str, **values: Any) -> dict[str, Any]:
        record = {
            "benchmark": self.benchmark,
            "run_id": self.run_id,
            "measurement": measurement,
            **{key: _rounded(value) for key, value in values.items()},
            "settings": self.settings,
            "machine": self.machine,
        }
        line = json.dumps(record, default=str)
        print(line)
        sys.stdout.flush()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a") as handle:
            handle.write(line + "\n")
        return record

    def footer(self) -> None:
        print(f"results appended to {self.out}")


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(item) for item in value]
    return value


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain-text table: columns padded to their widest cell, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        parts = [cell.rjust(width) if numeric[i] and index else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("x%"))
        return True
    except ValueError:
        return text in ("-", "")
