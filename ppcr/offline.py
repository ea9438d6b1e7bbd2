"""Nothing reaches the network at run time: the Hugging Face hub is offline unless the user says
otherwise (``HF_HUB_OFFLINE=0``). Models load from local paths only (``local_files_only=True`` in
:mod:`ppcr.model.mllm`); this guards every other hub call a library might make (tokenizer files,
chat templates, telemetry)."""

from __future__ import annotations

import os
import sys

VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")


def hub_offline_by_default() -> None:
    """Set the hub's offline switches unless the user set them; applied on importing ``ppcr``."""
    if os.environ.get("HF_HUB_OFFLINE") is not None:
        return  # the user's own choice
    for name in VARIABLES:
        os.environ.setdefault(name, "1")
    # huggingface_hub reads the variable once, when it is imported: if something imported it before
    # ppcr, set its switch too.
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
        constants.HF_HUB_DISABLE_TELEMETRY = True
