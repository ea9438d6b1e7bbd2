"""Nothing reaches the network at run time: the Hugging Face hub is offline unless the user says
otherwise (``HF_HUB_OFFLINE=0``). Models load from local files only (``local_files_only=True`` in
:mod:`ppcr.model.mllm`); this guards every other hub call a library might make (tokenizer files,
chat templates, telemetry).

``HF_HUB_OFFLINE=0`` is the one opt-in to the network, the hub's own switch (so ppcr and every
library agree on it): with it, ``model.mllm_path`` may be a hub id ("org/name"), which
:func:`ppcr.model.mllm.download_mllm` fetches into the hub cache before loading it from there."""

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


def hub_online() -> bool:
    """Whether the user opted in to the hub (``HF_HUB_OFFLINE=0``), as huggingface_hub itself reads it."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE
