"""Expressions longer than the text context: cut as open_clip cuts them (end token kept), counted, and
warned about once with the counts, so that a cut never passes silently."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

__all__ = ["TruncationCount", "cut_to_context"]


def cut_to_context(full: torch.Tensor, context: int, eot_id: int) -> tuple[torch.Tensor, list[int]]:
    """Token ids tokenized at a longer context, (B, L0) with zero padding, cut to ``context`` positions
    exactly as open_clip's tokenizer cuts at ``context`` (the first positions, EOT last); also the positions
    each text needs, up to its EOT (L0 for a text that needs L0 or more). Returns ((B, context) ids, B lengths)."""
    needed = (full == eot_id).int().argmax(dim=1) + 1  # (B,): SOT, the word pieces, EOT
    ids = full[:, :context].clone()  # (B, context)
    cut = needed > context
    ids[cut, -1] = eot_id
    return ids, needed.tolist()


class TruncationCount:
    """How many expressions a tokenizer has cut to its ``context`` positions (``cut`` of ``seen``). The first
    batch with a cut expression warns once, with its counts, an example and ``flag``, the setting to raise."""

    def __init__(self, context: int, flag: str = "--max-words"):
        self.context, self.flag = context, flag
        self.seen = self.cut = 0
        self.warned = False

    def record(self, texts: Sequence[str], needed: Sequence[int], measured: int | None = None) -> None:
        """Count one batch: ``needed[i]``, the positions ``texts[i]`` needs, start and end tokens included
        (``measured``: the most the caller could measure; a text at it needs that many or more)."""
        cut = [i for i, n in enumerate(needed) if n > self.context]
        self.seen += len(texts)
        self.cut += len(cut)
        if cut and not self.warned:
            self.warned = True
            longest = max(cut, key=lambda i: needed[i])
            warnings.warn(
                f"{len(cut)} of {len(texts)} expressions in this batch need more than the {self.context} token positions "
                f"of the text context and are cut, end token kept (texts[{longest}] needs {needed[longest]}"
                f"{' or more' if needed[longest] == measured else ''}: "
                f"{texts[longest][:80]!r}); raise {self.flag} to keep them. Shown once; later cuts are counted",
                stacklevel=3,
            )

    def summary(self) -> str:
        """One line: how many of the expressions seen were cut ('' when none was)."""
        if not self.cut:
            return ""
        return f"{self.cut} of {self.seen} expressions were cut to {self.context} token positions (raise {self.flag} to keep them)"
