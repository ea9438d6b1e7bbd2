"""A trained PPCR model as a plain directory, loadable without DeepSpeed:

    config.yaml              the resolved config (paths inside point into this directory)
    mllm/                    the base MLLM with PPCR's token rows written in, tokenizer and processor
    adapters/semantic/       LoRA branch A in peft's own format
    adapters/spatial/        LoRA branch B in peft's own format
    heads.safetensors        SemSP projectors and box head
    sam.pth                  SAM's state_dict, the layout of Meta's checkpoints
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ppcr.config import Config, dump_config, load_config
from ppcr.model.lora import BRANCHES
from ppcr.model.model import PPCRModel
from ppcr.model.sam import SamSegmenter, load_sam
from ppcr.model.mllm import load_mllm

HEADS = ("sem_to_llm", "sem_to_sam", "box_head")


def _base_state_dict(model: PPCRModel) -> dict[str, torch.Tensor]:
    """The MLLM's own weights without LoRA, under the names transformers expects."""
    base = model.mllm.base_model.model
    state = {}
    for k, v in base.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    head_key = next(k for k in state if k.endswith("lm_head.weight"))
    ids = model.token_rows.new_ids
    if model.token_rows.new_in is not None:
        state[embed_key] = state[embed_key].clone()
        state[embed_key][ids] = model.token_rows.new_in.detach().to(state[embed_key].dtype)
    if model.token_rows.new_out is not None:
        state[head_key] = state[head_key].clone()
        state[head_key][ids] = model.token_rows.new_out.detach().to(state[head_key].dtype)
    return state


def save_pretrained(model: PPCRModel, cfg: Config, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = model.mllm.base_model.model
    base.save_pretrained(out / "mllm", state_dict=_base_state_dict(model))
    model.processor.save_pretrained(out / "mllm")
    model.mllm.save_pretrained(out / "adapters")  # one sub-directory per branch
    heads = {f"{name}.{k}": v.detach().contiguous() for name in HEADS
             for k, v in getattr(model, name).state_dict().items()}
    save_file(heads, out / "heads.safetensors")
    torch.save(model.sam.sam.state_dict(), out / "sam.pth")
    saved = replace(cfg, model=replace(cfg.model, mllm_path="mllm", sam_checkpoint="sam.pth", tiny_family=None))
    (out / "config.yaml").write_text(dump_config(saved))
    return out


def load_pretrained(path: str | Path, dtype: str | None = None) -> tuple[PPCRModel, Config]:
    """A saved directory -> (model in eval mode, its config with paths resolved)."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a saved PPCR model (config.yaml missing)")
    cfg = load_config(path / "config.yaml")
    m = replace(cfg.model, mllm_path=str(path / cfg.model.mllm_path), sam_checkpoint=str(path / cfg.model.sam_checkpoint),
                dtype=dtype or cfg.model.dtype)
    cfg = replace(cfg, model=m)
    mllm, processor = load_mllm(m.mllm_path, m.dtype)
    model = PPCRModel(mllm, processor, SamSegmenter(load_sam(m)), m, cfg.train.loss)
    for branch in BRANCHES:
        weights = load_file(path / "adapters" / branch / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model.mllm, weights, adapter_name=branch)
        if result.unexpected_keys:
            raise ValueError(f"{path}/adapters/{branch}: unexpected keys {result.unexpected_keys[:3]}")
    heads = load_file(path / "heads.safetensors")
    for name in HEADS:
        prefix = f"{name}."
        getattr(model, name).load_state_dict({k[len(prefix):]: v for k, v in heads.items() if k.startswith(prefix)})
    return model.eval(), cfg
