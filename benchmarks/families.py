"""What MaskSD costs per training step on each model family's tiny example (examples/families/), on this CPU.

    python -m benchmarks.families                  # every family, 10 rounds after 2 warm-up steps
    python -m benchmarks.families --families lavt etris --rounds 20

Each family's tiny random-init model (two samples, 32-64 px) is wrapped twice around the same
weights: MaskSD with both branches off (the bare model's training step) and MaskSD with the family's
configuration (docs/families.md). A step is forward, backward and Adam; the two alternate, one step
of each per round, and the median over rounds is reported with its ratio, beside the FLOP ratio
(FlopCounterMode, 2 per multiply-add, the same step). Tiny-model CPU time: it says how the branches
scale each family's step, not what a real model costs on a GPU (benchmarks.train_step measures
CRIS there). Also the adapter's measured line count. Writes benchmarks/results/families.{md,json}.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import command_line, count_flops, markdown_table, write_results
from examples.families import FAMILIES, adapter_lines, load
from examples.pipeline.cli import ScriptParser, run_script
from masksd import MaskSD, MaskSDConfig

VARIANTS = ("baseline", "MaskSD")


class FamilyBench:
    """One family's segmenter under the baseline and its MaskSD configuration, one Adam over both."""

    def __init__(self, name: str, seed: int = 0):
        module = load(name)
        segmenter, self.images, self.texts, _ = module.build(seed)
        self.models = {"baseline": MaskSD(segmenter, MaskSDConfig.baseline()).train(), "MaskSD": MaskSD(segmenter, module.CONFIG).train()}
        with torch.no_grad():
            self.truth = (torch.sigmoid(segmenter.eval()(self.images, self.texts)) > 0.5).float()
        params = {id(p): p for model in self.models.values() for p in model.parameters() if p.requires_grad}
        self.optimizer = torch.optim.Adam(params.values(), lr=1e-6)
        self.lines = adapter_lines(module)

    def loss(self, variant: str) -> torch.Tensor:
        return self.models[variant].train()(self.images, self.texts, self.truth).loss

    def step(self, variant: str) -> float:
        """Seconds of one training step of ``variant``: forward, backward, Adam."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(variant).backward()
        self.optimizer.step()
        return time.perf_counter() - start

    def measure(self, warmup: int, rounds: int) -> dict[str, float]:
        """Median seconds per variant over ``rounds`` alternating rounds (order swapped every round)."""
        for _ in range(warmup):
            for variant in VARIANTS:
                self.step(variant)
        seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for r in range(rounds):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                seconds[variant].append(self.step(variant))
        return {variant: statistics.median(s) for variant, s in seconds.items()}

    def flops(self, variant: str) -> int:
        total, _, _ = count_flops(lambda: self.loss(variant).backward())
        self.optimizer.zero_grad(set_to_none=True)
        return total


def measure_families(names: list[str], warmup: int, rounds: int) -> tuple[list[list[str]], dict]:
    """The table's rows and the results' numbers for the families ``names``."""
    rows, data = [], {}
    for name in names:
        torch.manual_seed(0)
        bench = FamilyBench(name)
        seconds = bench.measure(warmup, rounds)
        flops = {variant: bench.flops(variant) for variant in VARIANTS}
        time_ratio, flop_ratio = seconds["MaskSD"] / seconds["baseline"], flops["MaskSD"] / flops["baseline"]
        rows.append([name, bench.lines, f"{1000 * seconds['baseline']:.1f}", f"{1000 * seconds['MaskSD']:.1f}",
                     f"{time_ratio:.2f}", f"{flop_ratio:.2f}"])
        data[name] = {"adapter_lines": bench.lines, "median_s": seconds, "flops": flops, "time_ratio": time_ratio, "flop_ratio": flop_ratio}
    return rows, data


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant")
    parser.add_argument("--rounds", type=int, default=10, help="measured steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the least disturbed by other work)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows, data = measure_families(args.families, args.warmup, args.rounds)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the tests) keeps its own
    header = ["family", "adapter lines", "baseline ms / step", "MaskSD ms / step", "time × baseline", "FLOPs × baseline"]
    markdown = (
        f"# MaskSD's cost per training step, by model family (tiny models, CPU)\n\n"
        f"Tiny random-init models, 2 samples, {args.threads} torch thread(s), on a machine shared with other work; median of {args.rounds} alternating rounds "
        f"after {args.warmup} warm-up steps (forward, backward, Adam). FLOPs: FlopCounterMode, same step.\n\n"
        + markdown_table(header, rows)
    )
    print(markdown)
    paths = write_results("families", markdown, {"threads": args.threads, "rounds": args.rounds, "families": data},
                          command_line("benchmarks.families", argv))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    run_script(main)
