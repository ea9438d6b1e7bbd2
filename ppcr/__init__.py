"""PPCR: referring image segmentation with a multimodal LLM, two LoRA branches, a box head and SAM."""

from ppcr.offline import hub_offline_by_default

hub_offline_by_default()
