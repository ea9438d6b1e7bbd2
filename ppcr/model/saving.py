"""A trained PPCR model as a plain directory, loadable without DeepSpeed:

    config.yaml              the resolved config (paths inside point into this directory)
    ppcr_base.json           the fingerprint of mllm/ and the SAM file as written (ppcr.model.fingerprint),
                             checked at every load
    mllm/                    the base MLLM with PPCR's token rows written in, tokenizer and processor
    adapters/semantic/       LoRA branch A in peft's own format
    adapters/spatial/        LoRA branch B in peft's own format
    heads.safetensors        SemSP projectors and box head
    sam.safetensors          SAM's state_dict (Meta's key layout); exports written before this hold sam.pth,
                             which still loads (config.yaml names the file)
    ppcr_export.json         {"format_version": EXPORT_VERSION}, the version of this layout, checked at every load
    README.md                the model card (ppcr.model.card, written by ppcr-export)

Every weight is in safetensors: nothing in a saved model is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ppcr.common.checkpoint_paths import latest_tag
from ppcr.config import Config, ConfigError, ModelConfig, dump_config, load_config, parse_overrides, with_dtype
from ppcr.model.fingerprint import (
    CONFIG_FILE,
    TRAINED_ON_FILE,
    base_fingerprint,
    check_base,
    pin_revision,
    read_fingerprint,
    write_fingerprint,
)
from ppcr.model.lora import BRANCHES
from ppcr.model.mllm import load_mllm
from ppcr.model.model import PPCRModel
from ppcr.model.sam import SamSegmenter, load_sam, save_sam_state

HEADS = ("sem_to_llm", "sem_to_sam", "box_head")
EXPORT_FILE = "ppcr_export.json"
# Of the layout above. An export without EXPORT_FILE was written before versions were recorded, in this layout.
EXPORT_VERSION = 1


def check_export_version(path: Path) -> None:
    """ValueError naming ``path``'s EXPORT_FILE and its field for an export of another layout version (a newer
    ppcr's, whose files this one would misread) or an unreadable record."""
    f = path / EXPORT_FILE
    if not f.is_file():
        return  # written before versions were recorded: the layout of version 1
    try:
        version = json.loads(f.read_text()).get("format_version")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{f}: not a readable export record (a JSON object with 'format_version'): {e}") from e
    if version != EXPORT_VERSION:
        raise ValueError(
            f"{f}: format_version {version!r} is not {EXPORT_VERSION}, an export of another ppcr: load it with the "
            f"ppcr that wrote it, or export its run again with this one (ppcr-export --checkpoint RUN --out DIR)"
        )


def token_rows_into(state: dict[str, torch.Tensor], model: PPCRModel) -> dict[str, torch.Tensor]:
    """``state`` (an MLLM state dict) with the trained rows of PPCR's new tokens written into its
    embedding and LM head."""
    ids = model.token_rows.new_ids
    for suffix, rows in (
        ("embed_tokens.weight", model.token_rows.new_in),
        ("lm_head.weight", model.token_rows.new_out),
    ):
        if rows is not None:
            key = next(k for k in state if k.endswith(suffix))
            state[key] = state[key].clone()
            state[key][ids] = rows.detach().to(state[key].dtype)
    return state


def _base_state_dict(model: PPCRModel) -> dict[str, torch.Tensor]:
    """The MLLM's own weights without LoRA, under the names transformers expects, token rows written in."""
    base = model.mllm.base_model.model
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    return token_rows_into(state, model)


def save_pretrained(model: PPCRModel, cfg: Config, out: str | Path) -> Path:
    """Write ``model`` (with its config) as a saved model directory (the layout above), every weight in
    safetensors."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = model.mllm.base_model.model
    base.save_pretrained(out / "mllm", state_dict=_base_state_dict(model))
    model.processor.save_pretrained(out / "mllm")
    model.mllm.save_pretrained(out / "adapters")  # one sub-directory per branch
    (out / "adapters" / "README.md").unlink(missing_ok=True)  # peft's blank template; the export's card says it all
    heads = {
        f"{name}.{k}": v.detach().contiguous() for name in HEADS for k, v in getattr(model, name).state_dict().items()
    }
    save_file(heads, out / "heads.safetensors")
    save_sam_state(model.sam.sam.state_dict(), out / "sam.safetensors")
    saved = replace(
        cfg,
        model=replace(
            cfg.model, mllm_path="mllm", sam_checkpoint="sam.safetensors", mllm_revision=None, tiny_family=None
        ),
    )
    (out / "config.yaml").write_text(dump_config(saved))
    fingerprint = base_fingerprint(
        replace(saved.model, mllm_path=str(out / "mllm"), sam_checkpoint=str(out / "sam.safetensors"))
    )
    fingerprint["mllm"]["path"], fingerprint["sam"]["path"] = "mllm", "sam.safetensors"  # inside the export
    write_fingerprint(out, fingerprint)
    (out / EXPORT_FILE).write_text(json.dumps({"format_version": EXPORT_VERSION}) + "\n")
    return out


# model.* settings that apply to an export: how its weights are computed and decoded. Every other one is fixed by
# the weights it holds, so an override of it is refused rather than silently ignored.
EXPORT_SETTINGS = ("max_new_tokens", "attn_implementation")


def export_settings(overrides: list[str] | None) -> dict[str, object]:
    """The ``model.*`` settings ``overrides`` give an export (:data:`EXPORT_SETTINGS`); ConfigError naming any
    other ``model.*`` key."""
    tree = parse_overrides(overrides or []).get("model", {})
    refused = [k for k in tree if k not in EXPORT_SETTINGS]
    if refused:
        raise ConfigError(
            f"config key 'model.{refused[0]}' cannot apply to an export: its weights fix the model "
            f"(an export takes {', '.join('model.' + k for k in EXPORT_SETTINGS)}; dtype with --dtype)"
        )
    return tree


def load_pretrained(
    path: str | Path,
    dtype: str | None = None,
    device_map: str | None = None,
    *,
    allow_base_mismatch: bool = False,
    settings: dict[str, object] | None = None,
) -> tuple[PPCRModel, Config]:
    """A saved directory -> (model in eval mode, in model.dtype throughout, its config with paths resolved).
    ``device_map`` ("auto") lets transformers/accelerate place a large MLLM over the visible GPUs. Its MLLM and
    SAM files must be those it was written with (its ``ppcr_base.json``), else
    :class:`ppcr.model.fingerprint.BaseMismatch` unless ``allow_base_mismatch``. ``settings``:
    :data:`EXPORT_SETTINGS` to apply (:func:`export_settings`)."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a saved PPCR model (config.yaml missing)")
    check_export_version(path)
    cfg = load_config(path / "config.yaml")
    cfg = with_dtype(cfg, dtype or cfg.model.dtype)
    m = replace(
        cfg.model,
        mllm_path=str(path / cfg.model.mllm_path),
        sam_checkpoint=str(path / cfg.model.sam_checkpoint),
        **(settings or {}),
    )
    cfg = replace(cfg, model=m)
    check_base(read_fingerprint(path), m, what=f"export {path}", allow=allow_base_mismatch)
    mllm, processor = load_mllm(m.mllm_path, m.dtype, device_map=device_map, attn_implementation=m.attn_implementation)
    model = PPCRModel(mllm, processor, SamSegmenter(load_sam(m)), m, cfg.train.loss)
    for branch in BRANCHES:
        weights = load_file(path / "adapters" / branch / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model.mllm, weights, adapter_name=branch)
        if result.unexpected_keys:
            raise ValueError(f"{path}/adapters/{branch}: unexpected keys {result.unexpected_keys[:3]}")
    heads = load_file(path / "heads.safetensors")
    for name in HEADS:
        prefix = f"{name}."
        getattr(model, name).load_state_dict({k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix)})
    return model.eval(), cfg


def resolve_checkpoint(path: str | Path) -> tuple[str, Path, Path | None, str | None]:
    """What a user's --checkpoint names: ("saved", config, None, None) for a saved model, or
    ("run", config, run_dir, tag) for a run directory (its latest checkpoint) or a checkpoint dir."""
    path = Path(path)
    if (path / "heads.safetensors").is_file():
        return "saved", path / "config.yaml", None, None
    if (path / "checkpoints").is_dir():
        tag = latest_tag(path / "checkpoints")
        if tag is None:
            raise FileNotFoundError(f"{path}/checkpoints has no complete checkpoint yet (no 'latest')")
        return "run", _config_of(path / "checkpoints" / tag), path, tag
    if path.name.startswith("step_") and (path.parent.parent / "config.yaml").is_file():
        return "run", _config_of(path), path.parent.parent, path.name
    raise FileNotFoundError(f"checkpoint {path}: neither a run directory, a checkpoint directory nor a saved model")


def _config_of(ckpt: Path) -> Path:
    """The config a checkpoint was written with: its own copy, or for a checkpoint from before copies were kept,
    the run's (which the latest launch wrote)."""
    own = ckpt / CONFIG_FILE
    return own if own.is_file() else ckpt.parent.parent / "config.yaml"


def check_trainable_state(
    model: torch.nn.Module, loaded: Iterable[str], unexpected: Iterable[str], where: str | Path
) -> None:
    """After ``model.load_state_dict(state, strict=False)`` of a checkpoint without frozen weights: raise
    RuntimeError unless every key of the checkpoint is in the model (``unexpected`` empty) and every
    trainable parameter of the model (requires_grad, from model.trainable) came from the checkpoint
    (is among ``loaded``). Frozen parameters may be missing: they come from the base paths
    (model.mllm_path, model.sam_checkpoint); an older checkpoint that still holds them loads too."""
    loaded = set(loaded)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in loaded]
    unexpected = list(unexpected)
    if missing or unexpected:
        parts = [
            f"{len(keys)} {what}, first {keys[:3]}"
            for keys, what in (
                (missing, "trainable parameter(s) missing from the checkpoint"),
                (unexpected, "key(s) not in the model"),
            )
            if keys
        ]
        raise RuntimeError(
            f"checkpoint {where} does not fit the model built from its config: "
            + "; ".join(parts)
            + " (are model.trainable and model.lora those the run was trained with?)"
        )


def load_checkpoint(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    device: str | torch.device | None = None,
    device_map: str | None = None,
    dtype: str | None = None,
    allow_base_mismatch: bool = False,
) -> tuple[PPCRModel, Config, Path | None, str | None]:
    """A model in eval mode from a saved model or a DeepSpeed checkpoint, its config (the checkpoint's own copy,
    with ``overrides``; for a saved model only :data:`EXPORT_SETTINGS` of ``model.*``, any other is refused), and
    the run directory and checkpoint tag (None for a saved model). ``dtype`` (a ``model.dtype`` value) loads the
    model in another dtype than it was trained in. Placement (:func:`place`), for run checkpoints and exports
    alike: on ``device`` (default: stays on the CPU), or with ``device_map`` ("auto": the MLLM spread over the
    visible GPUs by accelerate, the other parts on its first one). Before anything is built,
    the base files the config names are compared with the checkpoint's fingerprint
    (:func:`ppcr.model.fingerprint.check_base`): a difference raises ``BaseMismatch`` naming the file, both
    hashes and the flag, unless ``allow_base_mismatch``.

    A DeepSpeed checkpoint holds the trainable parameters only (frozen ones come from the base paths
    of the config): the model is built from model.mllm_path and model.sam_checkpoint, in model.dtype,
    and DeepSpeed's own zero_to_fp32 consolidates the trainable fp32 weights alone
    (exclude_frozen_parameters) into it; it reads ZeRO-2 and ZeRO-3 shards of any number of ranks,
    size-0 partitions included, with no engine and no process group. Every key of the checkpoint must
    be in the model and every trainable parameter must come from it (:func:`check_trainable_state`).
    Older checkpoints that still hold frozen weights load the same way: their frozen weights, equal
    to the base's, are skipped."""
    kind, config_file, run_dir, tag = resolve_checkpoint(path)
    cfg = load_config(config_file, overrides)
    if dtype is not None:  # not through the overrides, which would not fit the run's train.precision
        cfg = with_dtype(cfg, dtype)
    if kind == "saved":
        settings = export_settings(overrides)
        cfg = replace(cfg, model=replace(cfg.model, **settings))
        model, _ = load_pretrained(
            path, dtype=dtype, device_map=device_map, allow_base_mismatch=allow_base_mismatch, settings=settings
        )
        return place(model, device=device, device_map=device_map), cfg, None, None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run_dir / "checkpoints" / tag
    saved = read_fingerprint(ckpt)
    cfg = replace(cfg, model=pin_revision(cfg.model, saved))
    check_base(saved, cfg.model, what=f"checkpoint {ckpt}", allow=allow_base_mismatch)
    model = PPCRModel.from_config(cfg.model, cfg.train.loss, device_map=device_map)
    state = get_fp32_state_dict_from_zero_checkpoint(
        str(run_dir / "checkpoints"), tag=tag, exclude_frozen_parameters=True
    )
    result = model.load_state_dict(state, strict=False)
    check_trainable_state(model, state.keys(), result.unexpected_keys, run_dir / "checkpoints" / tag)
    return place(model.eval(), device=device, device_map=device_map), cfg, run_dir, tag


def place(model: PPCRModel, *, device: str | torch.device | None, device_map: str | None) -> PPCRModel:
    """Put a loaded model where it runs. Without ``device_map``: all of it on ``device`` (None: where it is).
    With one, the MLLM was dispatched by accelerate when it loaded; every other part (token rows, projectors,
    box head, SAM) goes to the device of the MLLM's input embeddings, where PPCR builds its inputs, and the
    language model's and vision tower's outputs come back there (accelerate's io_same_device hook): PPCR calls
    those submodules itself, so the hook accelerate puts on the whole model's forward does not apply."""
    if device_map is None:
        return model if device is None else model.to(device)
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    first = model.mllm.get_input_embeddings().weight.device
    for module in (model.family.language_model, *model.family.vision_modules):
        add_hook_to_module(module, AlignDevicesHook(io_same_device=True), append=True)
    for name, child in model.named_children():
        if name != "mllm":
            child.to(first)
    return model


def trained_state(path: str | Path, m: ModelConfig, *, allow_base_mismatch: bool = False) -> tuple[dict, bool]:
    """The trained weights of a PPCR model (``model.init_from``: an export, a run directory or a checkpoint) as
    a state dict under :class:`PPCRModel`'s names, for a new run built from ``m``, and whether it holds every
    weight (an export) or the trained ones only (a checkpoint). The base weights ``m`` names must be those the
    source was trained on (its fingerprint; an export keeps its checkpoint's as ``ppcr_trained_on.json``), else
    ``BaseMismatch`` unless ``allow_base_mismatch``."""
    kind, _, run_dir, tag = resolve_checkpoint(path)
    if kind == "saved":
        check_base(
            read_fingerprint(Path(path), TRAINED_ON_FILE), m, what=f"model.init_from {path}", allow=allow_base_mismatch
        )
        model, _ = load_pretrained(path)
        return model.state_dict(), True
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run_dir / "checkpoints" / tag
    check_base(read_fingerprint(ckpt), m, what=f"model.init_from {ckpt}", allow=allow_base_mismatch)
    return get_fp32_state_dict_from_zero_checkpoint(
        str(run_dir / "checkpoints"), tag=tag, exclude_frozen_parameters=True
    ), False
