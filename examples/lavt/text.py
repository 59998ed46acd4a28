"""LAVT's tokenizer: BERT's WordPiece, from a snapshot's ``bert/`` folder, or a tiny vocabulary for the random model.

The tiny vocabulary holds BERT's special tokens, every word of the synthetic scenes' grammar, and single letters,
digits and punctuation with their ``##`` continuations, so that any other text still tokenizes (WordPiece spells
an unknown word letter by letter) instead of collapsing to [UNK].
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from masksd.data.synthetic import COLOURS, RELATIONS, SHAPES, SIZES
from masksd.integrations.hfclip import require_transformers

__all__ = ["BERT_SPECIAL_TOKENS", "load_tokenizer", "tiny_vocabulary"]

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""BERT's special tokens, in the order bert-base-uncased numbers them among themselves."""


def tiny_vocabulary() -> dict[str, int]:
    """Token -> id of the random model's WordPiece vocabulary (special tokens first, [PAD] = 0)."""
    words = ["the", *SIZES, *COLOURS, *SHAPES, *(w for relation in RELATIONS for w in relation.split())]
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = list(dict.fromkeys([*BERT_SPECIAL_TOKENS, *words, *pieces, *(f"##{p}" for p in pieces)]))
    return {token: index for index, token in enumerate(tokens)}


def load_tokenizer(pretrained: str | None) -> Any:
    """The snapshot's BERT tokenizer (``<pretrained>/bert``), or the tiny vocabulary's for None (lower-casing, as
    bert-base-uncased)."""
    transformers = require_transformers()
    if pretrained is None:
        return transformers.BertTokenizer(vocab=tiny_vocabulary(), do_lower_case=True)
    folder = Path(pretrained) / "bert"
    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{folder} holds no BERT tokenizer (vocab.txt or tokenizer.json): {error}") from error
