"""Ready-made adapters for the model families RIS code is built on.

- :class:`OpenCLIPTowers`: an open_clip ``CLIP`` with a ViT or ``ModifiedResNet`` image tower (or a
  module with OpenAI CLIP's ViT attribute layout) split at the patch (or stem) and token embeddings.
- :class:`HFCLIPTowers`: the same for a transformers ``CLIPModel``.
- :class:`HFSiglipTowers`: the same for a transformers ``SiglipModel`` (attention-pooled images).
- :class:`TowerSegmenter`: towers plus your decode head -> a segmenter MaskSD wraps.
- :class:`DecoderHead`: your model's own decoder, with its own signature, as that decode head.
- :class:`CLIPSegSegmenter`: transformers ``CLIPSegForImageSegmentation`` as a segmenter.

Nothing here imports open_clip or transformers until a class that needs it is used; install the
extra named in the error (``pip install "masksd[open-clip]"`` or ``"masksd[transformers]"``).
"""

from masksd._lazy import lazy_exports
from masksd.integrations.towers import DecoderHead, ImageContext, TextContext, Towers, TowerSegmenter

__all__ = ["CLIPSegSegmenter", "DecoderHead", "HFCLIPTowers", "HFSiglipTowers", "ImageContext", "OpenCLIPTowers", "TextContext", "TowerSegmenter", "Towers"]

__getattr__, __dir__ = lazy_exports(globals(), {  # each name's module, imported on first use
    "OpenCLIPTowers": "masksd.integrations.openclip",
    "HFCLIPTowers": "masksd.integrations.hfclip",
    "HFSiglipTowers": "masksd.integrations.siglip",
    "CLIPSegSegmenter": "masksd.integrations.clipseg",
})
