"""Images per second of the synthetic referring scenes: indexed directly, and through a
DataLoader with 0 workers (torch's default threads, and one thread) and 2 workers
(batch 32, masksd.data.collate).

    python -m benchmarks.data_throughput [--sizes 64 480]

DataLoader figures are steady state: the clock starts after the first batch, so
worker start-up is not counted. Each figure is the best of --repeats runs, since
a shared machine's other load only ever slows a run down. Writes
benchmarks/results/data_throughput.{md,json} with the command and the machine.
"""

from __future__ import annotations

import os
import time

import torch
from torch.utils.data import DataLoader

from benchmarks.common import command_line, markdown_table, write_results
from examples.pipeline.cli import ScriptParser, run_script
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


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 480], help="image sizes S to measure")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    rows, data = [], {}
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
        rows.append([size, n, *(f"{x:.0f}" for x in best)])
        data[str(size)] = dict(zip(("direct", "loader_0_workers", "loader_0_workers_1_thread", "loader_2_workers"), best))

    header = ["S (px)", "items", "direct `ds[i]` (img/s)", "DataLoader, 0 workers (img/s)",
              "same, torch 1 thread (img/s)", "DataLoader, 2 workers (img/s)"]
    markdown = (
        "# Synthetic referring scenes: data throughput\n\n"
        f"Default SyntheticConfig (3–6 objects), batch size {args.batch_size}, `masksd.data.collate`; DataLoader "
        f"figures exclude the first batch (worker start-up); each figure is the best of {args.repeats} runs; "
        f"1-minute load average {load_before:.2f} before and {os.getloadavg()[0]:.2f} after.\n\n"
        + markdown_table(header, rows)
    )
    print(markdown)
    command = command_line("benchmarks.data_throughput", argv)
    paths = write_results("data_throughput", markdown, {"batch_size": args.batch_size, "images_per_s": data}, command)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    run_script(main)
