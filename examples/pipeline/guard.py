"""Divergence: a run whose loss stops being finite ends with one line, and no checkpoint ever holds
non-finite weights.

The training step never waits for the device to say whether its loss was finite:
:meth:`DivergenceGuard.observe` keeps the count of non-finite steps and the first one's step and loss
parts on the device; the count rides to the host with the logged losses (copied without waiting, read
one log interval later), and :meth:`DivergenceGuard.check` reads it directly before every checkpoint
and validation. A non-finite loss at step s therefore stops the run by step s + 2·log_every − 1 at the
latest, and before any checkpoint after it. AMP's skipped steps are not divergence: fp16's gradient
scaler skips a step whose *gradients* overflowed, and the loss the guard watches stays finite then.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["DivergenceGuard", "TrainingDiverged", "nonfinite_tensors", "check_finite_weights"]


class TrainingDiverged(ValueError):
    """The loss of a training run became non-finite (NaN or ±inf): the run stopped without writing a checkpoint
    after it. A ValueError, so that a script prints it as one line (``examples.pipeline.cli.USER_ERRORS``)."""


class DivergenceGuard:
    """Watches the loss parts of every training step for NaN and ±inf without a host sync per step.

    ``fields``: the loss parts' names (the keys :meth:`observe` reads); ``distributed``: sum the count over
    the ranks in :meth:`check`. The errors name ``kept``, the loop's words for the checkpoint that survives.
    """

    def __init__(self, fields: Sequence[str], device: torch.device, distributed: bool = False):
        self.fields = tuple(fields)
        self.distributed = distributed
        self.count = torch.zeros((), device=device)  # non-finite steps so far (float: it joins the logged losses)
        self.first_step = torch.zeros((), dtype=torch.long, device=device)  # the first such step (0: none yet)
        self.first_parts = torch.zeros(len(self.fields), device=device)  # its loss parts

    def observe(self, losses: Mapping[str, torch.Tensor | None], step: int) -> None:
        """Record step ``step``'s loss parts ({field: scalar tensor or None}); device work only, no sync."""
        parts = torch.stack([
            losses[k].detach().float() if losses.get(k) is not None else self.count.new_zeros(()) for k in self.fields
        ])  # (F,)
        bad = ~torch.isfinite(parts).all()
        first = bad & (self.count == 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.first_parts = torch.where(first, parts, self.first_parts)
        self.count = self.count + bad

    def check(self, stopped_at: int, kept: str) -> None:
        """Raise :class:`TrainingDiverged` if any step so far (on any rank) had a non-finite loss. Waits for the
        device (call it where the loop waits anyway: before a checkpoint or a validation). Under DDP every
        rank must call it (the count is summed over ranks)."""
        count = self.count.clone()
        if self.distributed:
            dist.all_reduce(count)
        if count.item() > 0:
            self.stop(stopped_at, kept)

    def stop(self, stopped_at: int, kept: str) -> None:
        """Raise :class:`TrainingDiverged` naming the first non-finite step and its parts (read from the device:
        the run ends here anyway). ``stopped_at``: the step the run reached; ``kept``: the checkpoint kept."""
        step = int(self.first_step.item())
        if step == 0:  # another rank diverged first: its gradients made ours non-finite in the next step
            raise TrainingDiverged(f"training diverged on another rank; stopped at step {stopped_at}; {kept}")
        values = dict(zip(self.fields, self.first_parts.tolist()))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        terms = [k for k in bad if k != "loss"] or bad  # the parts that made the total ("loss") non-finite
        named = terms[0] if len(terms) == 1 else f"{', '.join(terms[:-1])} and {terms[-1]}"
        parts = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        raise TrainingDiverged(
            f"training diverged at step {step}: {named} {'is' if len(terms) == 1 else 'are'} not finite ({parts}); "
            f"stopped at step {stopped_at}; {kept}. Lower --lr, or set --grad-clip"
        )

    def check_weights(self, state: Mapping[str, torch.Tensor], stopped_at: int, kept: str) -> None:
        """Raise :class:`TrainingDiverged` if the state dict ``state`` about to be saved holds NaN or ±inf (a step
        whose loss was finite can still overflow its update). Every rank computes the same answer (DDP keeps
        the weights equal), so every rank raises together."""
        check_finite_weights(state, f"the model after step {stopped_at}", f"stopped without saving it; {kept}")


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state`` (a state dict) that hold NaN or ±inf (one wait for
    the device in all)."""
    names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state[k]).all() for k in names]).tolist()  # (T,) on the device, read once
    return [k for k, ok in zip(names, finite) if not ok]


def check_finite_weights(state: Mapping[str, torch.Tensor], what: str, advice: str = "use an earlier checkpoint") -> None:
    """Raise :class:`TrainingDiverged` naming ``what`` (e.g. "checkpoint runs/x/last.pt") and a few tensors
    if any floating-point tensor of the state dict ``state`` holds NaN or ±inf; ``advice`` ends the line."""
    bad = nonfinite_tensors(state)
    if bad:
        raise TrainingDiverged(
            f"{what} holds non-finite weights in {len(bad)} of {len(state)} tensors (e.g. {', '.join(bad[:3])}): "
            f"training diverged; {advice}"
        )
