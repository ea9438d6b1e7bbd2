"""The box head that localises from the image tokens (``model.box_head: pointer``).

An MLP that regresses four numbers from SpaSP alone (``model.box_head: mlp``, :class:`ppcr.model.heads.BoxHead`)
must squeeze "where is it" through one vector: measured on the default, its boxes came from the position
words, not from the image (DESIGN.md section 9). Grounding models that work select image tokens or regions
with the query instead and read the box from what they selected (DETR's queries over image features,
MDETR's token-level alignment, Kosmos-2's patch-index locations, CenterNet's centre heatmap plus
per-location size). Here:

1. SpaSP scores every image token's last-layer state of the spatial stage (a scaled dot product of a
   query and a key projection): a softmax over the image tokens, trained to put its mass on the tokens
   the target covers (:func:`pointer_losses`);
2. every image token regresses the box of the object it belongs to from its vision feature and its cell's
   centre (:class:`TokenBoxRegressor`; seeded from the vision pretraining's per-token box head where the
   MLLM directory holds one, :data:`TOKEN_BOX_FILE`);
3. the box is the softmax-weighted mean of the boxes of the selected tokens (the best-scoring token and
   every token whose box overlaps its box at IoU >= 0.5: one object, not a blend of two), refined by an
   MLP on SpaSP and the selected tokens' states (initialised to change nothing).

The same selection runs in training and at prediction. Nothing here sees the box text: the spatial
answer writes it after [LOC], and the image tokens come before [LOC].
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss

from ppcr.model.heads import MLP, BoxOutput, ImageTokens

TOKEN_BOX_FILE = "ppcr_token_box_head.safetensors"  # beside the MLLM's weights, written by ppcr-pretrain
SAME_OBJECT_IOU = 0.5  # tokens whose boxes overlap the best token's box this much are read with it


def token_centres(grid: tuple[int, int], device=None) -> torch.Tensor:
    """(gh * gw, 2) normalised (x, y) centres of a gh x gw grid of image tokens in raster order."""
    gh, gw = grid
    ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) / gh
    xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) / gw
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)


def token_cover(masks: torch.Tensor, input_sizes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, gh * gw): the share of each image token's cell the target mask covers. ``masks`` (B, S, S) are in
    SAM's frame (the image in the top-left ``input_sizes`` (B, 2) h, w, padding after); the MLLM's image is
    the whole image resized, so the image region of SAM's frame maps onto the token grid. Host tensors:
    computed in ``PPCRModel.prepare``, where sizes are read without a device sync."""
    rows = []
    for m, (h, w) in zip(masks, input_sizes.tolist()):
        region = m[:h, :w].float()[None, None]
        rows.append(F.adaptive_avg_pool2d(region, grid).flatten())  # area share per cell
    return torch.stack(rows)


class TokenBoxRegressor(nn.Module):
    """Each image token's vision feature and its cell's centre -> the box of the object it belongs to,
    (x1, y1, x2, y2) in [0, 1]. The layout of the vision pretraining's per-token box head
    (``ppcr.pretrain.vision.DenseHeads``: Linear, ReLU, Linear, sigmoid, corners sorted) with the centre as
    two extra inputs, so a tower without absolute position embeddings (Qwen2-VL's 2-D RoPE) can place a
    box too; seeded from the pretrained head, the centre's weights start at zero."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden + 2, width), nn.ReLU(), nn.Linear(width, 4))

    def forward(self, features: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:  # (B, T, H), (T, 2)
        x = torch.cat([features, centres.to(features.dtype).expand(*features.shape[:-1], 2)], -1)
        raw = self.net(x).sigmoid()
        return torch.cat([torch.minimum(raw[..., :2], raw[..., 2:]), torch.maximum(raw[..., :2], raw[..., 2:])], -1)

    @torch.no_grad()
    def seed(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Load the pretrained per-token head (keys ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``, on the
        feature alone); the centre's input weights are zeroed."""
        first, last = self.net[0], self.net[2]
        hidden = first.in_features - 2
        want = {
            "0.weight": (first.out_features, hidden),
            "0.bias": (first.out_features,),
            "2.weight": tuple(last.weight.shape),
            "2.bias": tuple(last.bias.shape),
        }
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != want:
            raise ValueError(
                f"{where}: the per-token box head has shapes {got}, the pointer needs {want} "
                f"(model.box_head_hidden must be the pretrained head's width, {got.get('0.bias', '?')})"
            )
        first.weight.zero_()
        first.weight[:, :hidden] = state["0.weight"]
        first.bias.copy_(state["0.bias"])
        last.weight.copy_(state["2.weight"])
        last.bias.copy_(state["2.bias"])


class PointerBoxHead(nn.Module):
    """SpaSP points at image tokens; the box comes from the selected tokens' own boxes (module docstring)."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.query = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, width))
        self.key = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, width))
        self.token_box = TokenBoxRegressor(hidden, width)
        self.refine = MLP([2 * hidden, width, 4])
        nn.init.zeros_(self.refine.net[-1].weight)  # the refinement starts as the identity
        nn.init.zeros_(self.refine.net[-1].bias)

    def seed_from(self, mllm_path: str | Path) -> bool:
        """Seed the per-token regressor from ``<mllm_path>/`` :data:`TOKEN_BOX_FILE` when it exists."""
        path = Path(mllm_path) / TOKEN_BOX_FILE
        if not path.is_file():
            return False
        self.token_box.seed(load_file(path), str(path))
        return True

    def forward(self, spasp: torch.Tensor, tokens: ImageTokens) -> BoxOutput:
        q = self.query(spasp)  # (B, D)
        k = self.key(tokens.states)  # (B, T, D)
        logits = (k @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(q.shape[-1])  # (B, T)
        # the boxes in fp32 whatever the model's dtype: bf16 cannot hold 1 - 1e-4, whose logit would be inf
        corners = self.token_box(tokens.features, tokens.centres).float()  # (B, T, 4) xyxy
        weights = selected_weights(logits, corners)  # (B, T), sums to 1 over the selected tokens
        box = (weights.unsqueeze(-1) * corners).sum(1)  # (B, 4) xyxy
        pooled = (weights.unsqueeze(-1).to(tokens.states.dtype) * tokens.states).sum(1)  # (B, H)
        delta = self.refine(torch.cat([spasp, pooled.to(spasp.dtype)], -1)).float()
        box = box_convert(box, "xyxy", "cxcywh").clamp(1e-4, 1 - 1e-4)
        return BoxOutput(
            box=torch.sigmoid(torch.logit(box) + delta),
            token_logits=logits,
            token_boxes=box_convert(corners, "xyxy", "cxcywh"),
        )


def selected_weights(logits: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """(B, T) fp32 softmax weights kept on the best-scoring token and the tokens whose box overlaps its box
    at IoU >= :data:`SAME_OBJECT_IOU`, renormalised; ``corners`` (B, T, 4) xyxy. The choice is not
    differentiated; the weights within it are."""
    p = logits.float().softmax(-1)
    b, t = p.shape
    with torch.no_grad():
        best = corners[torch.arange(b, device=p.device), p.argmax(-1)]  # (B, 4)
        iou = box_iou(corners.reshape(b * t, 4).float(), best.float()).view(b, t, b)
        same = iou[torch.arange(b), :, torch.arange(b)] >= SAME_OBJECT_IOU  # (B, T); the best token is in it
    kept = p * same
    return kept / kept.sum(-1, keepdim=True)  # fp32


def pointer_losses(out: BoxOutput, cover: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pointer's per-token losses, means over the batch:

    - ``point``: cross-entropy between the softmax over image tokens and the target's share of each token
      (``cover`` (B, T), normalised per row): the selection, a classification over tokens, which small
      models learn fast;
    - ``token_l1``, ``token_giou``: L1 and GIoU of each token's own box against the target box (``target``
      (B, 4) cxcywh), weighted by the same shares: the tokens the pointer should select must carry the
      right box.
    """
    share = cover.float() / cover.float().sum(-1, keepdim=True).clamp(min=1e-6)  # (B, T)
    point = -(share * out.token_logits.float().log_softmax(-1)).sum(-1).mean()
    boxes = out.token_boxes.float()  # (B, T, 4)
    goal = target.float().unsqueeze(1).expand_as(boxes)
    l1 = (boxes - goal).abs().mean(-1)
    giou = generalized_box_iou_loss(
        box_convert(boxes, "cxcywh", "xyxy").reshape(-1, 4),
        box_convert(goal, "cxcywh", "xyxy").reshape(-1, 4),
        reduction="none",
    ).view_as(l1)
    return {"point": point, "token_l1": (share * l1).sum(-1).mean(), "token_giou": (share * giou).sum(-1).mean()}
