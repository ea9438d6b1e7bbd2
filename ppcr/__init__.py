"""PPCR: referring image segmentation with a multimodal LLM, two LoRA branches, a box head and SAM.

    from ppcr import Segmenter
    segmenter = Segmenter.from_pretrained("exports/default")  # or ppcr.load(...)
    result = segmenter("photo.jpg", "the red circle")

``import ppcr`` stays light (no torch): the API is imported on first use (:mod:`ppcr.eval.segmenter`).
"""

from ppcr.offline import hub_offline_by_default

hub_offline_by_default()

__all__ = ["Segmenter", "Segmentation", "load"]


def __getattr__(name: str):
    """``ppcr.Segmenter``, ``ppcr.Segmentation`` and ``ppcr.load`` (= ``Segmenter.from_pretrained``), imported
    when first asked for."""
    if name in __all__:
        from ppcr.eval import segmenter

        return segmenter.Segmenter.from_pretrained if name == "load" else getattr(segmenter, name)
    raise AttributeError(f"module 'ppcr' has no attribute {name!r}")
