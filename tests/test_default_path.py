"""The default MaskSD path computes exactly what it computed before issue 26 (fused encoders, guidance sources,
input-site masking, combined views).

The numbers below were recorded by running :func:`fingerprint` with the code at main's HEAD 0655959 (before any of
issue 26's changes), on this project's x86-64 CPU machine with one thread. Every loss is compared bit for bit
(``float.hex``), every masked set exactly, and the trained model's eval logits by their float64 sum's hex: a change
that reorders one float operation of the default path fails here. If this test fails on another CPU kind while the
other tests pass, re-record on that machine from main's HEAD code (``python -m tests.test_default_path``) and
compare, rather than editing the numbers.
"""

from __future__ import annotations

import torch

from examples.cris import CRIS, CRISConfig
from masksd import BranchConfig, MaskSD, MaskSDConfig
from tests.toys import ConvGRU, ToyViT, colour_task

CONFIGS = {
    "default": MaskSDConfig,
    "separate_heads": lambda: MaskSDConfig(share_weights=False),
    "no_masking": lambda: MaskSDConfig(masking=False),
    "bottom": lambda: MaskSDConfig(lmvsd=BranchConfig(select="bottom"), vmlsd=BranchConfig(select="bottom")),
    "k1": lambda: MaskSDConfig(lmvsd=BranchConfig(top_k=1.0), vmlsd=BranchConfig(top_k=1.0)),
    "checkpointed_frozen_bn": lambda: MaskSDConfig(checkpoint_branches=True, branch_norm_stats="freeze"),
}
SEGMENTERS = {"ToyViT": ToyViT, "ConvGRU": ConvGRU, "CRIS": lambda: CRIS(CRISConfig.tiny())}
CRIS_CONFIGS = ("default", "separate_heads", "features")  # CRIS has the features site's protocol; the toys do not
CONFIGS["features"] = lambda: MaskSDConfig(lmvsd=BranchConfig(site="features"))


def cases() -> list[tuple[str, str]]:
    toys = [(s, c) for s in ("ToyViT", "ConvGRU") for c in CONFIGS if c != "features"]
    return toys + [("CRIS", c) for c in CRIS_CONFIGS]


def task(segmenter: str, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if segmenter != "CRIS":
        return colour_task(4, seed=1)
    size = model.config.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 1, size, size)
    masks[0, :, : size // 2, : size // 2] = 1
    masks[1, :, size // 4 :, size // 2 :] = 1
    return images, model.tokenize(["the red car on the left", "a man"]), masks


def fingerprint(segmenter: str, config: str, steps: int = 3) -> dict:
    """Losses (hex), masked positions and the eval logits' sum (hex) of ``steps`` SGD steps of MaskSD on a toy."""
    torch.manual_seed(0)
    model = MaskSD(SEGMENTERS[segmenter](), CONFIGS[config]()).train()
    images, ids, masks = task(segmenter, model.segmenter)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(3)
    record: dict = {"losses": [], "image_masked": [], "text_masked": []}
    for _ in range(steps):
        out = model(images, ids, masks, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        record["losses"].append([float(v.detach()).hex() for v in (out.loss, out.seg_loss, out.lmvsd_loss, out.vmlsd_loss)])
        record["image_masked"].append(out.image_masked.nonzero().tolist())
        record["text_masked"].append(out.text_masked.nonzero().tolist())
    with torch.no_grad():
        record["eval"] = float(model.eval()(images, ids).double().sum()).hex()
    return record


def compact(record: dict) -> dict:
    """The record with masked positions as flat index strings (shorter to store)."""
    flat = lambda steps: [" ".join(f"{b}.{i}" for b, i in step) for step in steps]  # noqa: E731
    return {**record, "image_masked": flat(record["image_masked"]), "text_masked": flat(record["text_masked"])}


RECORDED: dict[str, dict] = {'CRIS/default': {'eval': '-0x1.478f2c5200000p+17',
                  'image_masked': ['0.0 0.1 0.14 0.23 0.28 0.32 0.37 0.43 1.16 1.17 1.18 1.32 1.45 1.51 1.57 1.60',
                                   '0.3 0.10 0.17 0.26 0.30 0.38 0.52 0.53 1.3 1.22 1.27 1.35 1.46 1.48 1.49 1.50',
                                   '0.5 0.16 0.24 0.34 0.36 0.57 0.58 0.61 1.1 1.20 1.29 1.37 1.42 1.48 1.51 1.61'],
                  'losses': [['0x1.2845960000000p+1', '0x1.5bb3840000000p+0', '0x1.baed440000000p-1', '0x1.7610260000000p-4'],
                             ['0x1.bc4a780000000p+0', '0x1.451a280000000p+0', '0x1.a5cbb80000000p-2', '0x1.b7ac5a0000000p-5'],
                             ['0x1.8d86680000000p+1', '0x1.70ee980000000p+1', '0x1.96aee80000000p-3', '0x1.96710c0000000p-6']],
                  'text_masked': ['0.6 1.1', '0.2 1.1', '0.3 1.1']},
 'CRIS/features': {'eval': '0x1.bcd6171800000p+10',
                   'image_masked': ['0.0 0.1 0.14 0.23 0.28 0.32 0.37 0.43 1.16 1.17 1.18 1.32 1.45 1.51 1.57 1.60',
                                    '0.3 0.29 0.45 0.47 0.48 0.52 0.53 0.59 1.22 1.27 1.40 1.46 1.49 1.50 1.51 1.59',
                                    '0.5 0.16 0.24 0.34 0.35 0.36 0.57 0.58 1.1 1.20 1.21 1.29 1.37 1.44 1.51 1.61'],
                   'losses': [['0x1.f49ea60000000p+0', '0x1.3b04c80000000p+0', '0x1.43e2700000000p-1', '0x1.7a8a6c0000000p-4'],
                              ['0x1.a222560000000p+0', '0x1.5353c00000000p+0', '0x1.15f9340000000p-2', '0x1.2a09480000000p-5'],
                              ['0x1.eaf8ec0000000p+1', '0x1.d5d34a0000000p+1', '0x1.2b8b2a0000000p-3', '0x1.3677f00000000p-6']],
                   'text_masked': ['0.6 1.1', '0.2 1.1', '0.3 1.1']},
 'CRIS/separate_heads': {'eval': '-0x1.4c58097cd0000p+17',
                         'image_masked': ['0.0 0.1 0.14 0.23 0.28 0.32 0.37 0.43 1.16 1.17 1.18 1.32 1.45 1.51 1.57 1.60',
                                          '0.3 0.10 0.17 0.26 0.30 0.38 0.52 0.53 1.3 1.22 1.27 1.35 1.46 1.48 1.49 1.50',
                                          '0.5 0.16 0.24 0.34 0.36 0.57 0.58 0.61 1.1 1.20 1.29 1.37 1.42 1.48 1.51 1.61'],
                         'losses': [['0x1.2845960000000p+1', '0x1.5bb3840000000p+0', '0x1.baed440000000p-1', '0x1.7610260000000p-4'],
                                    ['0x1.a88aa00000000p+0', '0x1.e0a2360000000p-1', '0x1.453b200000000p-1', '0x1.59bf4a0000000p-4'],
                                    ['0x1.c3f05a0000000p+1', '0x1.278d4a0000000p+1', '0x1.1d63a60000000p+0', '0x1.b627ae0000000p-4']],
                         'text_masked': ['0.6 1.1', '0.2 1.1', '0.3 1.1']},
 'ConvGRU/bottom': {'eval': '-0x1.23a306c000000p+4',
                    'image_masked': ['0.1 0.13 1.7 1.13 2.1 2.5 3.11 3.15',
                                     '0.4 0.8 1.10 1.11 2.1 2.2 3.2 3.11',
                                     '0.8 0.13 1.6 1.15 2.6 2.7 3.2 3.5'],
                    'losses': [['0x1.357bc80000000p+0', '0x1.3ed7be0000000p-1', '0x1.08d01a0000000p-1', '0x1.1a7dc40000000p-4'],
                               ['0x1.2fed2a0000000p+0', '0x1.34c5440000000p-1', '0x1.07e5680000000p-1', '0x1.197d360000000p-4'],
                               ['0x1.2a07840000000p+0', '0x1.2a5edc0000000p-1', '0x1.06aa6c0000000p-1', '0x1.182e000000000p-4']],
                    'text_masked': ['0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1']},
 'ConvGRU/checkpointed_frozen_bn': {'eval': '-0x1.2348d43800000p+4',
                                    'image_masked': ['0.0 0.3 1.0 1.12 2.0 2.14 3.3 3.14',
                                                     '0.0 0.2 1.5 1.9 2.4 2.14 3.4 3.14',
                                                     '0.12 0.15 1.0 1.8 2.3 2.13 3.1 3.12'],
                                    'losses': [['0x1.357be00000000p+0', '0x1.3ed7be0000000p-1', '0x1.08d04c0000000p-1', '0x1.1a7dc40000000p-4'],
                                               ['0x1.2fecac0000000p+0', '0x1.34c4b00000000p-1', '0x1.07e5040000000p-1', '0x1.197d260000000p-4'],
                                               ['0x1.2a06fe0000000p+0', '0x1.2a5d9a0000000p-1', '0x1.06aaa80000000p-1', '0x1.182dd40000000p-4']],
                                    'text_masked': ['0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1']},
 'ConvGRU/default': {'eval': '-0x1.23b5a3f000000p+4',
                     'image_masked': ['0.0 0.3 1.0 1.12 2.0 2.14 3.3 3.14',
                                      '0.0 0.2 1.5 1.9 2.4 2.14 3.4 3.14',
                                      '0.12 0.15 1.0 1.8 2.3 2.13 3.1 3.12'],
                     'losses': [['0x1.357be00000000p+0', '0x1.3ed7be0000000p-1', '0x1.08d04c0000000p-1', '0x1.1a7dc40000000p-4'],
                                ['0x1.2fecac0000000p+0', '0x1.34c4b00000000p-1', '0x1.07e5040000000p-1', '0x1.197d260000000p-4'],
                                ['0x1.2a06fe0000000p+0', '0x1.2a5d9a0000000p-1', '0x1.06aaa80000000p-1', '0x1.182dd40000000p-4']],
                     'text_masked': ['0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1']},
 'ConvGRU/k1': {'eval': '-0x1.23b347f000000p+4',
                'image_masked': ['0.0 0.3 0.5 0.14 1.0 1.7 1.12 1.13 2.0 2.1 2.2 2.5 3.3 3.11 3.14 3.15',
                                 '0.0 0.4 0.8 0.11 1.5 1.9 1.10 1.11 2.1 2.2 2.4 2.14 3.2 3.4 3.11 3.14',
                                 '0.0 0.3 0.12 0.15 1.0 1.6 1.8 1.15 2.2 2.6 2.7 2.13 3.2 3.5 3.6 3.12'],
                'losses': [['0x1.357c160000000p+0', '0x1.3ed7be0000000p-1', '0x1.08d0b60000000p-1', '0x1.1a7dc40000000p-4'],
                           ['0x1.2fece20000000p+0', '0x1.34c4520000000p-1', '0x1.07e5ce0000000p-1', '0x1.197d1a0000000p-4'],
                           ['0x1.2a071a0000000p+0', '0x1.2a5dc40000000p-1', '0x1.06aab40000000p-1', '0x1.182dda0000000p-4']],
                'text_masked': ['0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1']},
 'ConvGRU/no_masking': {'eval': '-0x1.237f074800000p+4',
                        'image_masked': ['', '', ''],
                        'losses': [['0x1.354caa0000000p+0', '0x1.3e81720000000p-1', '0x1.08c9b00000000p-1', '0x1.1a719a0000000p-4'],
                                   ['0x1.3048b60000000p+0', '0x1.356a040000000p-1', '0x1.07f5500000000p-1', '0x1.1990c60000000p-4'],
                                   ['0x1.2af9fa0000000p+0', '0x1.2c074c0000000p-1', '0x1.06dfe00000000p-1', '0x1.18664e0000000p-4']],
                        'text_masked': ['', '', '']},
 'ConvGRU/separate_heads': {'eval': '-0x1.239862e800000p+4',
                            'image_masked': ['0.0 0.3 1.0 1.12 2.0 2.14 3.3 3.14',
                                             '0.0 0.2 1.5 1.9 2.4 2.14 3.4 3.14',
                                             '0.12 0.15 1.0 1.8 2.3 2.13 3.1 3.12'],
                            'losses': [['0x1.357be00000000p+0', '0x1.3ed7be0000000p-1', '0x1.08d04c0000000p-1', '0x1.1a7dc40000000p-4'],
                                       ['0x1.2fff020000000p+0', '0x1.34c8540000000p-1', '0x1.0802ec0000000p-1', '0x1.19962e0000000p-4'],
                                       ['0x1.2a4a8e0000000p+0', '0x1.2a5f800000000p-1', '0x1.071f500000000p-1', '0x1.18b2660000000p-4']],
                            'text_masked': ['0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1']},
 'ToyViT/bottom': {'eval': '-0x1.079406bc00000p+5',
                   'image_masked': ['0.3 0.12 1.12 1.13 2.1 2.5 3.11 3.15',
                                    '0.2 0.15 1.5 1.9 2.1 2.2 3.3 3.4',
                                    '0.12 0.15 1.8 1.15 2.6 2.7 3.5 3.12'],
                   'losses': [['0x1.57595a0000000p+0', '0x1.82233e0000000p-1', '0x1.0934540000000p-1', '0x1.1ad92a0000000p-4'],
                              ['0x1.43b2cc0000000p+0', '0x1.59d0c60000000p-1', '0x1.0a1c3c0000000p-1', '0x1.1bc4c80000000p-4'],
                              ['0x1.2fbcbe0000000p+0', '0x1.3475fc0000000p-1', '0x1.07dd700000000p-1', '0x1.1930740000000p-4']],
                   'text_masked': ['0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1']},
 'ToyViT/checkpointed_frozen_bn': {'eval': '-0x1.074622ac00000p+5',
                                   'image_masked': ['0.0 0.14 1.0 1.7 2.0 2.2 3.8 3.14',
                                                    '0.4 0.8 1.10 1.11 2.4 2.13 3.2 3.11',
                                                    '0.8 0.13 1.0 1.6 2.2 2.13 3.13 3.14'],
                                   'losses': [['0x1.575d0e0000000p+0', '0x1.82233e0000000p-1', '0x1.093bb80000000p-1', '0x1.1ad92a0000000p-4'],
                                              ['0x1.43ace40000000p+0', '0x1.59c7760000000p-1', '0x1.0a19be0000000p-1', '0x1.1bc49a0000000p-4'],
                                              ['0x1.2fbaaa0000000p+0', '0x1.3470800000000p-1', '0x1.07ded80000000p-1', '0x1.192fe00000000p-4']],
                                   'text_masked': ['0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1']},
 'ToyViT/default': {'eval': '-0x1.074622ac00000p+5',
                    'image_masked': ['0.0 0.14 1.0 1.7 2.0 2.2 3.8 3.14',
                                     '0.4 0.8 1.10 1.11 2.4 2.13 3.2 3.11',
                                     '0.8 0.13 1.0 1.6 2.2 2.13 3.13 3.14'],
                    'losses': [['0x1.575d0e0000000p+0', '0x1.82233e0000000p-1', '0x1.093bb80000000p-1', '0x1.1ad92a0000000p-4'],
                               ['0x1.43ace40000000p+0', '0x1.59c7760000000p-1', '0x1.0a19be0000000p-1', '0x1.1bc49a0000000p-4'],
                               ['0x1.2fbaaa0000000p+0', '0x1.3470800000000p-1', '0x1.07ded80000000p-1', '0x1.192fe00000000p-4']],
                    'text_masked': ['0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1']},
 'ToyViT/k1': {'eval': '-0x1.06e4853e00000p+5',
               'image_masked': ['0.0 0.3 0.5 0.14 1.0 1.7 1.12 1.13 2.0 2.1 2.2 2.5 3.3 3.11 3.14 3.15',
                                '0.0 0.4 0.8 0.11 1.5 1.9 1.10 1.11 2.1 2.2 2.4 2.14 3.2 3.4 3.11 3.14',
                                '0.0 0.3 0.12 0.15 1.0 1.6 1.8 1.15 2.2 2.6 2.7 2.13 3.2 3.5 3.6 3.12'],
               'losses': [['0x1.575e2e0000000p+0', '0x1.82233e0000000p-1', '0x1.093dfa0000000p-1', '0x1.1ad92a0000000p-4'],
                          ['0x1.43bd760000000p+0', '0x1.59dce20000000p-1', '0x1.0a256a0000000p-1', '0x1.1bc50a0000000p-4'],
                          ['0x1.2fe4f20000000p+0', '0x1.349dd60000000p-1', '0x1.08054e0000000p-1', '0x1.1936080000000p-4']],
               'text_masked': ['0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1']},
 'ToyViT/no_masking': {'eval': '-0x1.0be2aa5800000p+5',
                       'image_masked': ['', '', ''],
                       'losses': [['0x1.56bbae0000000p+0', '0x1.80db260000000p-1', '0x1.093f4a0000000p-1', '0x1.1ae7520000000p-4'],
                                  ['0x1.449e060000000p+0', '0x1.5b99c60000000p-1', '0x1.0a27d20000000p-1', '0x1.1bd3a00000000p-4'],
                                  ['0x1.302a980000000p+0', '0x1.3515580000000p-1', '0x1.0811800000000p-1', '0x1.1972bc0000000p-4']],
                       'text_masked': ['', '', '']},
 'ToyViT/separate_heads': {'eval': '-0x1.07f03b3800000p+5',
                           'image_masked': ['0.0 0.14 1.0 1.7 2.0 2.2 3.8 3.14',
                                            '0.4 0.8 1.10 1.11 2.4 2.13 3.2 3.11',
                                            '0.8 0.13 1.0 1.6 2.2 2.13 3.13 3.14'],
                           'losses': [['0x1.575d0e0000000p+0', '0x1.82233e0000000p-1', '0x1.093bb80000000p-1', '0x1.1ad92a0000000p-4'],
                                      ['0x1.4445c20000000p+0', '0x1.59c2160000000p-1', '0x1.0b2e220000000p-1', '0x1.1cda6c0000000p-4'],
                                      ['0x1.324d500000000p+0', '0x1.34266c0000000p-1', '0x1.0c9f940000000p-1', '0x1.1ea4f00000000p-4']],
                           'text_masked': ['0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1', '0.1 1.1 2.1 3.1']}}
"""Recorded at main's HEAD 0655959 (before issue 26) with ``python -m tests.test_default_path``."""


def test_the_default_path_computes_what_main_computed_before_issue_26():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    assert set(RECORDED) == {f"{s}/{c}" for s, c in cases()}
    try:
        for key, expected in RECORDED.items():
            segmenter, config = key.split("/")
            assert compact(fingerprint(segmenter, config)) == expected, key
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":  # print the record (run with main's HEAD code to re-record)
    import pprint

    torch.set_num_threads(1)
    pprint.pprint({f"{s}/{c}": compact(fingerprint(s, c)) for s, c in cases()}, width=150)
