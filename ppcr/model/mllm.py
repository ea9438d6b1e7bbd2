"""The multimodal LLM: loading (a local path, or a hub id when the user opts in to the network) and
the few family-specific pieces PPCR needs.

PPCR drives the MLLM below its ``forward``: it computes the vision features once, builds each
stage's input embeddings itself (image features at the image tokens, new-token rows, the SemSP
placeholder), and runs the language model on them. What differs between families is isolated in
:class:`Family`: how image features come out, and how positions are numbered (Qwen2-VL's 3-D M-RoPE
against plain 1-D positions).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from ppcr.offline import hub_online

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
LLAVA_TYPES = ("llava",)


# Files a hub download skips: weights ppcr never loads (pickles, other frameworks' formats).
NOT_LOADED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf"]
# A hub cache snapshot directory: .../models--<org>--<name>/snapshots/<commit>
HUB_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{40})")


def looks_like_hub_id(path: str | Path) -> bool:
    """Whether ``path`` reads as a hub repo id "org/name" rather than a filesystem path: one slash, no
    leading '.', '/' or '~', a valid repo id, and no local directory named like its org (so a missing
    ``checkpoints/tiny-qwen2.5-vl`` stays a missing path)."""
    s = str(path)
    if s.count("/") != 1 or s.startswith((".", "/", "~")) or Path(s.split("/")[0]).is_dir():
        return False
    try:
        validate_repo_id(s)
    except HFValidationError:
        return False
    return True


def check_mllm_path(path: str | Path) -> Path | str:
    """``model.mllm_path`` as :func:`load_mllm` takes it: a local save_pretrained directory (a Path), or,
    with the hub online (``HF_HUB_OFFLINE=0``, :mod:`ppcr.offline`), a hub id (the string). Anything
    else raises FileNotFoundError saying what to download, or how to opt in to downloading."""
    if (Path(path) / "config.json").is_file():
        return Path(path)
    if looks_like_hub_id(path):
        if hub_online():
            return str(path)
        local = f"checkpoints/{str(path).split('/')[1]}"
        raise FileNotFoundError(
            f"model.mllm_path: no local directory {path}, and it reads as a hub id, but the hub is offline "
            f"(ppcr's default). Download it once, 'hf download {path} --local-dir {local}', and set "
            f"model.mllm_path={local}; or let the run download it into the hub cache: HF_HUB_OFFLINE=0"
        )
    raise FileNotFoundError(
        f"model.mllm_path: no MLLM checkpoint at {path} (config.json missing). A real model: "
        f"'hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir {path}' (or llava-hf/llava-1.5-7b-hf; README, "
        "'Real data and weights'), or a hub id with HF_HUB_OFFLINE=0; the tiny default: 'make models' or "
        "'ppcr-tiny --config <recipe>'"
    )


def snapshot_revision(path: str | Path) -> str | None:
    """The hub commit of a hub cache snapshot directory (or a file in one); None for any other path."""
    m = HUB_SNAPSHOT.search(str(Path(path).absolute()))
    return m["rev"] if m else None


def download_mllm(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of hub model ``repo_id`` at ``revision`` (a commit, branch or tag; None: the
    newest), downloaded into the hub cache (``HF_HOME``) where missing: config, safetensors weights,
    processor and tokenizer files, not :data:`NOT_LOADED`. A run records the commit it got
    (:func:`snapshot_revision` of the result) as ``model.mllm_revision`` and every later load of the run
    asks for that commit, so the base does not move when the hub repo does.

    Every rank of a run may call this at once, with no barrier: the hub cache takes a lock per file and
    downloads only what is still missing once it holds it (huggingface_hub's file_download), so a node
    fetches each file once while its other ranks wait; nodes share one download when HF_HOME is on a
    shared filesystem. (A barrier would also time out on a many-GB download.)"""
    try:
        return Path(snapshot_download(repo_id, revision=revision, ignore_patterns=NOT_LOADED))
    except (OSError, EntryNotFoundError) as e:  # no network, unknown or gated repo: the hub's own errors
        at = f" at revision {revision}" if revision else ""
        raise FileNotFoundError(
            f"model.mllm_path: could not download hub model {repo_id}{at} ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0]}). Check the id, the network (HF_ENDPOINT) and, for a "
            "gated model, 'hf auth login'; or download it yourself with 'hf download' (README, 'Real data "
            "and weights')"
        ) from e


def check_attn_implementation(name: str, dtype: str) -> None:
    """FlashAttention-2 needs its package, a CUDA GPU and a 16-bit dtype; say which is missing."""
    if name != "flash_attention_2":
        return
    missing = [
        what
        for what, ok in (
            (
                "the flash-attn package (pip install flash-attn --no-build-isolation)",
                importlib.util.find_spec("flash_attn") is not None,
            ),
            ("a CUDA GPU", torch.cuda.is_available()),
            ("a 16-bit model.dtype", dtype in ("bfloat16", "float16")),
        )
        if not ok
    ]
    if missing:
        raise ValueError(
            f"model.attn_implementation 'flash_attention_2' needs {', '.join(missing)}; "
            "'sdpa' (the default) runs everywhere"
        )


def load_mllm(
    path: str | Path,
    dtype: str = "float32",
    *,
    device_map: str | None = None,
    attn_implementation: str = "sdpa",
    revision: str | None = None,
) -> tuple[nn.Module, object]:
    """Model and processor from a local save_pretrained directory (safetensors weights), or from a hub
    id's snapshot at ``revision`` when the user opted in to the network (:func:`check_mllm_path`)."""
    path = check_mllm_path(path)
    if isinstance(path, str):
        path = download_mllm(path, revision)
    check_attn_implementation(attn_implementation, dtype)
    # safetensors only: a pickled pytorch_model.bin in a downloaded directory is refused, not unpickled.
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=DTYPES[dtype],
        local_files_only=True,
        use_safetensors=True,
        device_map=device_map,
        attn_implementation=attn_implementation,
    )
    if model.config.model_type not in QWEN_TYPES + LLAVA_TYPES:
        raise ValueError(
            f"model.mllm_path {path}: model_type '{model.config.model_type}' is not supported "
            f"(supported: {', '.join(QWEN_TYPES + LLAVA_TYPES)})"
        )
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


class Family:
    """Vision features and positions of one MLLM family. ``core`` is the model's ``.model``."""

    def __init__(self, core: nn.Module, config) -> None:
        self.core, self.config = core, config

    @property
    def language_model(self) -> nn.Module:
        return self.core.language_model

    @property
    def vision_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def image_features(self, vision: dict) -> torch.Tensor:
        """Processor image outputs -> (total image tokens, H), in the order of the image tokens."""
        raise NotImplementedError

    def token_grid(self, vision: dict) -> tuple[int, int]:
        """(rows, columns) of the image tokens of every image in the processor's (host) outputs ``vision``,
        raster order; the images of one batch must share it (PPCR's MLLM images are all one square size)."""
        raise NotImplementedError

    def select_images(self, vision: dict, index: list[int]) -> dict:
        """The processor's image outputs of the images ``index`` only (one entry per image along dim 0)."""
        return {k: v[index] for k, v in vision.items()}

    def split_features(self, features: torch.Tensor, vision: dict) -> list[torch.Tensor]:
        """:meth:`image_features` of several images -> one (tokens, H) tensor per image."""
        return list(features.chunk(len(vision["pixel_values"])))

    def positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: dict, text: dict
    ) -> torch.Tensor:
        """Position ids of a right-padded prompt batch: (B, L), or (3, B, L) for M-RoPE."""
        raise NotImplementedError

    @staticmethod
    def next_position(positions: torch.Tensor) -> torch.Tensor:
        """The position after the last one of a single unpadded sequence (decoding)."""
        return positions[..., -1:] + 1

    @staticmethod
    def text_keys() -> tuple[str, ...]:
        """Extra per-token tensors of the processor's text output that positions need."""
        return ()


class QwenVLFamily(Family):
    @property
    def vision_modules(self) -> list[nn.Module]:
        return [self.core.visual]

    def image_features(self, vision: dict) -> torch.Tensor:
        out = self.core.get_image_features(vision["pixel_values"], vision["image_grid_thw"])
        return torch.cat(list(out.pooler_output), dim=0)

    def _patches(self, vision: dict) -> list[int]:
        return vision["image_grid_thw"].prod(-1).tolist()  # flattened patches per image

    def select_images(self, vision, index):
        patches = vision["pixel_values"].split(self._patches(vision))
        return {
            "pixel_values": torch.cat([patches[i] for i in index]),
            "image_grid_thw": vision["image_grid_thw"][index],
        }

    def token_grid(self, vision):
        merge = self.config.vision_config.spatial_merge_size
        grids = {(h // merge, w // merge) for _, h, w in vision["image_grid_thw"].tolist()}
        if len(grids) != 1:
            raise ValueError(f"the images of a batch have different token grids {sorted(grids)}")
        return grids.pop()

    def split_features(self, features, vision):
        merge = self.core.visual.spatial_merge_size**2
        return list(features.split([n // merge for n in self._patches(vision)]))

    def positions(self, input_ids, attention_mask, vision, text):
        pos, _ = self.core.get_rope_index(
            input_ids, text["mm_token_type_ids"], image_grid_thw=vision["image_grid_thw"], attention_mask=attention_mask
        )
        return pos  # (3, B, L)

    @staticmethod
    def text_keys() -> tuple[str, ...]:
        return ("mm_token_type_ids",)


class LlavaFamily(Family):
    @property
    def vision_modules(self) -> list[nn.Module]:
        return [self.core.vision_tower, self.core.multi_modal_projector]

    def image_features(self, vision: dict) -> torch.Tensor:
        out = self.core.get_image_features(
            vision["pixel_values"],
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in out.pooler_output], dim=0)

    def token_grid(self, vision):
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size  # CLS dropped
        return side, side

    def positions(self, input_ids, attention_mask, vision, text):
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of a transformers ``...ForConditionalGeneration`` model."""
    config = model.config
    if config.model_type in QWEN_TYPES:
        return QwenVLFamily(model.model, config)
    if config.model_type in LLAVA_TYPES:
        return LlavaFamily(model.model, config)
    raise ValueError(f"unsupported model_type '{config.model_type}'")


def image_token_id(model: nn.Module) -> int:
    config = model.config
    return int(config.image_token_id if config.model_type in QWEN_TYPES else config.image_token_index)
