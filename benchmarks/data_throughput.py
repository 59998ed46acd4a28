"""Images per second of the synthetic referring scenes: indexed directly, and through a
DataLoader with 0 workers (torch's default threads, and one thread) and 2 workers
(batch 32, masksd.data.collate).

    python benchmarks/data_throughput.py [--sizes 64 480] [--output benchmarks/results/data_throughput.md]

(with masksd importable: installed, or PYTHONPATH=. from the repository root)

DataLoader figures are steady state: the clock starts after the first batch, so
worker start-up is not counted. Each figure is the best of --repeats runs, since
a shared machine's other load only ever slows a run down. Prints a markdown table; --output also writes it,
with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
from torch.utils.data import DataLoader

from masksd.data import SyntheticConfig, SyntheticReferDataset, collate


def direct(ds: SyntheticReferDataset, n: int) -> float:
    ds[0]  # warm-up: first-call allocations
    start = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - start)


def loader(ds: SyntheticReferDataset, workers: int, batch_size: int) -> float:
    it = iter(DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate))
    next(it)  # workers are up once the first batch is out
    start, count = time.perf_counter(), 0
    for batch in it:
        count += len(batch["index"])
    return count / (time.perf_counter() - start)


def single_threaded(measure):
    """Run ``measure`` with torch limited to one intra-op thread, as inside DataLoader workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure()
    finally:
        torch.set_num_threads(threads)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 480], help="image sizes S to measure")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    parser.add_argument("--output", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        n = 2000 if size <= 128 else 256  # about a second each on one core
        ds = SyntheticReferDataset(SyntheticConfig(image_size=size, num_samples=n + args.batch_size))
        best = [
            max(measure() for _ in range(args.repeats))
            for measure in (
                lambda: direct(ds, n),
                lambda: loader(ds, 0, args.batch_size),
                lambda: single_threaded(lambda: loader(ds, 0, args.batch_size)),
                lambda: loader(ds, 2, args.batch_size),
            )
        ]
        rows.append((size, n, *best))

    table = [
        "| S (px) | items | direct `ds[i]` (img/s) | DataLoader, 0 workers (img/s) | same, torch 1 thread (img/s) | DataLoader, 2 workers (img/s) |",
        "|---|---|---|---|---|---|",
    ]
    table += [f"| {s} | {n} | " + " | ".join(f"{x:.0f}" for x in figures) + " |" for s, n, *figures in rows]
    text = "\n".join(table)
    print(text)
    if args.output:
        machine = (
            f"{os.cpu_count()} CPU cores ({cpu_name()}), no GPU; torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), Python {platform.python_version()}; "
            f"1-minute load average {load_before:.2f} before and {os.getloadavg()[0]:.2f} after the run"
        )
        with open(args.output, "w") as f:
            f.write("# Synthetic referring scenes: data throughput\n\n")
            f.write(f"Command: `PYTHONPATH=. python {' '.join(sys.argv)}` (from the repository root)\n\n")
            f.write(f"Machine: {machine}\n\n")
            f.write("Default SyntheticConfig (3–6 objects), batch size "
                    f"{args.batch_size}, `masksd.data.collate`; DataLoader figures exclude the first batch (worker start-up); "
                    f"each figure is the best of {args.repeats} runs.\n\n")
            f.write(text + "\n")


if __name__ == "__main__":
    main()
