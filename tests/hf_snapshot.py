"""Tiny transformers snapshots on disk. A CLIPSeg snapshot, written as save_pretrained writes CIDAS/clipseg-rd64-refined (config,
weights, tokenizer files, preprocessor config), so that loading code runs offline. The tokenizer is
transformers' CLIPTokenizer built from open_clip's copy of CLIP's BPE vocabulary: the real vocabulary
and special tokens, not a stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

from examples.clipseg import CLIPSegRISConfig, _tiny_config

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # CLIPSeg's processor's


def write_clipseg_snapshot(folder: Path, seed: int = 0, image_size: int = 64) -> Path:
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    bpe = open_clip.get_tokenizer("ViT-B-16")
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's -> CLIP's own
    (folder / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = transformers.ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    transformers.CLIPSegProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(seed)
    model = transformers.CLIPSegForImageSegmentation(_tiny_config(CLIPSegRISConfig(image_size=image_size)))
    model.save_pretrained(folder)
    return folder


def write_lavt_snapshot(folder: Path, seed: int = 0) -> Path:
    """LAVT's two snapshots as ``LAVTConfig(pretrained=folder)`` reads them: ``swin/`` (a tiny random SwinModel and an
    image processor with ImageNet's statistics, as microsoft/swin-base-patch4-window12-384's) and ``bert/`` (a tiny
    random BertModel and a BertTokenizer of the tiny vocabulary), each written by save_pretrained."""
    import transformers

    from examples.lavt.config import LAVTConfig
    from examples.lavt.model import _encoders
    from examples.lavt.text import load_tokenizer

    torch.manual_seed(seed)
    swin, bert = _encoders(LAVTConfig(), None, transformers)
    swin.save_pretrained(folder / "swin")
    transformers.ViTImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(folder / "swin")
    bert.save_pretrained(folder / "bert")
    load_tokenizer(None).save_pretrained(folder / "bert")
    return folder
