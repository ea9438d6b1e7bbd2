"""Model FLOPs of a PPCR training sample and the peak FLOP/s of a device: model FLOP utilisation (MFU).

Training settles a sample's FLOPs once, on its first step (:class:`ppcr.train.loop.Utilisation`), with
**the formula** (:func:`flop_shapes`, :func:`sample_flops`) on that step's token counts; the 7B recipes'
memory estimator uses it on models built on the meta device. Under ZeRO-3 it reads partitioned weights: their
size is ``ds_numel`` (``numel()`` is 0). It leaves out what is small at 7B (under 0.1 % of a step: SAM's
prompt encoder and mask decoder, the projectors and box head, norms, activations, the loss); under gradient
checkpointing the recomputed forward is counted apart (hardware FLOPs, not model FLOPs).

**Counted** by torch's ``FlopCounterMode`` (taught the CPU's fused attention in tests/test_flops.py), every
matmul, convolution and attention as it ran: exact, and it works under ZeRO-3 too, but its dispatch mode
changes a step's floating-point results (gradients by up to 8e-6 on the tiny default), so training does not
run under it: a run would no longer give the losses it gives without it, nor resume exactly. The tests check
the formula against it (6 % below the count on the tiny models, tests/test_flops.py).

MFU is model FLOPs over time, against the peak: :data:`PEAK_BF16`'s data-sheet figure for a known GPU in a
16-bit dtype, otherwise (a CPU, another GPU, fp32) a timed matmul of the run's dtype on the rank's own
threads, measured once (:func:`matmul_rate`, 0.2 s): a CPU has no data-sheet figure that fits the cores
and clock a rank gets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ppcr.model.mllm import QwenVLFamily

# Dense bf16/fp16 peak FLOP/s from NVIDIA's data sheets (without sparsity), by a substring of the device name,
# checked in this order.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)
_MATMULS = (nn.Linear, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, whole even where ZeRO-3 has partitioned it (its own tensor is then empty)."""
    return getattr(p, "ds_numel", None) or p.numel()


def _weights(module: nn.Module, trainable: bool | None = None, skip: str | None = None) -> int:
    """Weights of the matmuls in ``module`` (Linear and Conv: 2 FLOPs per weight and token forward; not norms,
    biases or embeddings); ``trainable`` filters by requires_grad, ``skip`` leaves out modules whose name
    ends with it (the other LoRA branch)."""
    return sum(
        numel(m.weight)
        for name, m in module.named_modules()
        if isinstance(m, _MATMULS)
        and (trainable is None or m.weight.requires_grad == trainable)
        and not (skip and name.endswith(skip))
    )


def _window_pairs(grid: int, window: int) -> int:
    """Sum over windows of (tokens per window)^2 for a grid x grid map cut into window x window tiles,
    the edge tiles smaller (Qwen2.5-VL's window index)."""
    sides = [min(window, grid - i) for i in range(0, grid, window)]
    return sum((a * b) ** 2 for a in sides for b in sides)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@dataclass(frozen=True)
class FlopShapes:
    """What :func:`sample_flops` needs, read off a PPCRModel by :func:`flop_shapes`."""

    lm_weights: int  # matmul weights of the language model's layers one stage runs: the base and one LoRA branch
    lm_trained: int  # of them, those that train (LoRA; the base too where model.trainable.llm_base)
    lm_layers: int
    lm_attn_width: int  # heads x head dim of the queries
    head: int  # the LM head's weights (vocabulary x hidden)
    head_trained: bool
    vision_forward: int  # FLOPs of one image through the vision tower and projector
    vision_trained: bool
    sam_forward: int  # FLOPs of one image through SAM's image encoder
    sam_trained: bool


def flop_shapes(model) -> FlopShapes:
    """:class:`FlopShapes` of a :class:`ppcr.model.model.PPCRModel` (live, ZeRO-3 partitioned or on meta)."""
    lm = model.family.language_model
    text = model.mllm.base_model.model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    size = model.cfg.mllm_image_size
    core = model.family.core
    towers = model.family.vision_modules
    if isinstance(model.family, QwenVLFamily):  # merged patches; Qwen2.5-VL's blocks windowed but a few
        v = core.visual
        merge, patch = v.spatial_merge_size, v.patch_embed.patch_size
        grid = size // patch  # patches per side; windows are cut in merged tokens
        patches = grid * grid
        window = getattr(v, "window_size", None)  # None: Qwen2-VL, every block attends to the whole image
        full = set(getattr(v, "fullatt_block_indexes", range(len(v.blocks))))
        windowed = _window_pairs(grid // merge, window // merge // patch) * merge**4 if window else 0
        width = v.blocks[0].attn.qkv.in_features
        attention = sum(4 * width * (patches**2 if i in full else windowed) for i in range(len(v.blocks)))
        vision = (
            2 * patches * (_weights(v.patch_embed) + _weights(v.blocks[0]) * len(v.blocks))
            + 2 * (patches // merge**2) * _weights(v.merger)
            + attention
        )
    else:  # LLaVA: CLIP, every layer run (the features come from the second-last)
        vc = core.vision_tower.config
        tower = getattr(core.vision_tower, "vision_model", core.vision_tower)  # transformers 4 wraps it
        patches = (size // vc.patch_size) ** 2
        tokens = patches + 1  # CLIP's class token
        vision = (
            2 * patches * _weights(tower.embeddings)
            + 2 * tokens * _weights(tower.encoder)
            + 4 * vc.hidden_size * tokens**2 * vc.num_hidden_layers
            + 2 * patches * _weights(core.multi_modal_projector)
        )
    enc = model.sam.sam.image_encoder
    grid = enc.img_size // enc.patch_embed.proj.kernel_size[0]
    sam = 2 * grid**2 * (_weights(enc.patch_embed) + _weights(enc.neck))
    for blk in enc.blocks:
        dim, w = blk.attn.qkv.in_features, blk.window_size
        padded = (-(-grid // w) * w) ** 2 if w else grid**2  # windowed blocks pad the map to whole windows
        pairs = (padded // w**2) * w**4 if w else grid**4
        sam += 2 * padded * (numel(blk.attn.qkv.weight) + numel(blk.attn.proj.weight))
        sam += 2 * grid**2 * _weights(blk.mlp) + 4 * dim * pairs
    head = model.token_rows.head[0].weight
    return FlopShapes(
        lm_weights=_weights(lm.layers, skip=".spatial"),
        lm_trained=_weights(lm.layers, trainable=True, skip=".spatial"),
        lm_layers=len(lm.layers),
        lm_attn_width=text.num_attention_heads * head_dim,
        head=numel(head),
        head_trained=head.requires_grad,
        vision_forward=vision,
        vision_trained=any(_trains(m) for m in towers),
        sam_forward=sam,
        sam_trained=_trains(enc),
    )


def sample_flops(x: FlopShapes, tokens: dict[str, dict[str, float]], gradient_checkpointing: bool) -> dict[str, float]:
    """FLOPs of one training sample by part; ``tokens`` per stage: ``image``, ``text`` (prompt and answer)
    and ``answer`` (labelled) tokens of a sample, e.g. :func:`per_sample`.

    Per stage with T tokens (image + text) and A labelled ones, with W the matmul weights of the language
    model's layers one stage runs (W_t of them train), L layers, d = heads x head dim, H the LM head's
    weights:

    - forward: 2 W T + 4 L d T^2 (scores and their product with the values, causal counted whole, as
      PaLM's MFU does) + 2 H A (the LM head runs at the labelled positions only);
    - backward: every weight passes its input's gradient on, 2 W T, and a trained one also gets its own,
      2 W_t T (so a frozen weight costs 2 + 2, not the 2 + 4 of "6 N T"); attention, which has no
      weights, twice its forward, 8 L d T^2; the LM head 2 H A, and 2 H A more where it trains;
    - the vision tower and SAM's image encoder: one forward per sample for both stages (matmuls 2 x
      weights x tokens, attention 4 x width x token pairs, windowed blocks' pairs per window and SAM's
      padding to whole windows; SAM's relative-position terms, under 2 % of an attention, are left out),
      three times that where they train;
    - ``recompute``: the forward of the language model's layers again in backward under gradient
      checkpointing; counted in hardware FLOPs (HFU), not in model FLOPs (MFU)."""
    out = {"lm_forward": 0, "lm_backward": 0, "lm_head": 0, "recompute": 0}
    for stage in ("semantic", "spatial"):
        t, a = tokens[stage]["image"] + tokens[stage]["text"], tokens[stage]["answer"]
        attention = 4 * x.lm_layers * x.lm_attn_width * t * t
        forward = 2 * x.lm_weights * t + attention
        out["lm_forward"] += forward
        out["lm_backward"] += 2 * (x.lm_weights + x.lm_trained) * t + 2 * attention
        out["lm_head"] += (6 if x.head_trained else 4) * x.head * a
        out["recompute"] += forward if gradient_checkpointing else 0
    out["vision_tower"] = x.vision_forward * (3 if x.vision_trained else 1)
    out["sam_image_encoder"] = x.sam_forward * (3 if x.sam_trained else 1)
    out["model"] = sum(v for k, v in out.items() if k != "recompute")
    out["hardware"] = out["model"] + out["recompute"]
    return out


def per_sample(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per stage, a sample's mean ``image``, ``text`` and ``answer`` tokens from a batch's counts
    (:meth:`ppcr.model.inputs.StageInputs.counts`: rows, tokens, image, answer)."""
    return {
        stage: {
            "image": c["image"] / c["rows"],
            "text": (c["tokens"] - c["image"]) / c["rows"],
            "answer": c["answer"] / c["rows"],
        }
        for stage, c in counts.items()
    }


def gpu_peak(name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU named ``name`` (:data:`PEAK_BF16`), or None."""
    return None if name is None else next((flops for key, flops in PEAK_BF16 if key in name), None)


def matmul_rate(device: torch.device | str, dtype: torch.dtype, *, n: int = 1024, seconds: float = 0.2) -> float:
    """FLOP/s of n x n x n matmuls in ``dtype`` on ``device`` with this process's threads, back to back for
    about ``seconds`` after a warm-up. Its own random generator: drawing from the global one at the start of a
    resumed run would change every later dropout mask, and the resume would no longer be exact."""
    gen = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, generator=gen).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    a @ b
    sync()
    reps = max(1, round(seconds / max(time.perf_counter() - t0, 1e-6)))
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s of ``device`` for ``dtype`` and where the figure comes from (the module's docstring)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        if gpu_peak(name):
            return gpu_peak(name), f"{name}, dense 16-bit data sheet"
    return matmul_rate(device, dtype, n=4096 if device.type == "cuda" else 1024), f"measured {dtype} matmul"
