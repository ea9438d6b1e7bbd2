"""Which parameters train: named components, the policy from config, and the table printed at start."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ppcr.config import TrainableConfig

# Component of a parameter from its name in PPCRModel.named_parameters(); first match wins.
_RULES: list[tuple[str, callable]] = [
    ("lora_semantic", lambda n: "lora_" in n and ".semantic" in n),
    ("lora_spatial", lambda n: "lora_" in n and ".spatial" in n),
    ("new_token_rows", lambda n: n.startswith("token_rows.")),
    ("projectors", lambda n: n.startswith(("sem_to_llm.", "sem_to_sam."))),
    ("box_head", lambda n: n.startswith("box_head.")),
    # With one output mask, SAM's decoder never uses its other hypernetwork MLPs or its IoU head.
    (
        "sam_decoder_unused",
        lambda n: (
            n.startswith(
                ("sam.sam.mask_decoder.iou_prediction_head.", "sam.sam.mask_decoder.output_hypernetworks_mlps.")
            )
            and not n.startswith("sam.sam.mask_decoder.output_hypernetworks_mlps.0.")
        ),
    ),
    ("sam_mask_decoder", lambda n: n.startswith("sam.sam.mask_decoder.")),
    ("sam_prompt_encoder", lambda n: n.startswith("sam.sam.prompt_encoder.")),
    ("sam_image_encoder", lambda n: n.startswith("sam.sam.image_encoder.")),
    ("vision_tower", lambda n: any(k in n for k in (".visual.", ".vision_tower.", ".multi_modal_projector."))),
    ("embeddings", lambda n: "embed_tokens." in n),
    ("lm_head", lambda n: "lm_head." in n),
    ("llm_base", lambda n: ".language_model." in n),
]


def component(name: str) -> str:
    for comp, match in _RULES:
        if match(name):
            return comp
    return "other"


def apply_policy(model: nn.Module, t: TrainableConfig) -> None:
    """Set requires_grad for every parameter from the policy; called once, before any optimizer."""
    train = {
        "lora_semantic": True,
        "lora_spatial": True,
        "new_token_rows": True,
        "projectors": True,
        "box_head": True,
        "sam_mask_decoder": t.sam_mask_decoder,
        "sam_decoder_unused": False,
        "sam_prompt_encoder": t.sam_prompt_encoder,
        "sam_image_encoder": t.sam_image_encoder,
        "vision_tower": t.vision_tower,
        "embeddings": t.embeddings == "full",
        "lm_head": t.lm_head == "full",
        "llm_base": t.llm_base,
    }
    for name, p in model.named_parameters():
        comp = component(name)
        if comp == "other":
            raise ValueError(f"parameter {name} belongs to no known component: extend ppcr.model.params._RULES")
        p.requires_grad_(train[comp])


def parameter_counts(model: nn.Module) -> OrderedDict[str, tuple[int, int]]:
    """component -> (trainable, frozen) parameter counts."""
    counts: OrderedDict[str, list[int]] = OrderedDict((c, [0, 0]) for c, _ in _RULES)
    for name, p in model.named_parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 partitions hold size-0 tensors
        counts.setdefault(component(name), [0, 0])[0 if p.requires_grad else 1] += n
    return OrderedDict((k, (v[0], v[1])) for k, v in counts.items() if sum(v))


def parameter_table(model: nn.Module) -> str:
    rows = parameter_counts(model)
    lines = [f"{'component':<20} {'trainable':>12} {'frozen':>12} {'count':>12}"]
    for comp, (tr, fr) in rows.items():
        lines.append(f"{comp:<20} {tr:>12,} {fr:>12,} {tr + fr:>12,}")
    tr, fr = sum(v[0] for v in rows.values()), sum(v[1] for v in rows.values())
    lines.append(f"{'total':<20} {tr:>12,} {fr:>12,} {tr + fr:>12,}")
    return "\n".join(lines)
