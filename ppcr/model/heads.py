"""The small trained heads around the MLLM, and what a box head reads and returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ImageTokens:
    """What a box head may read of each row's image: B rows of T image tokens each."""

    states: torch.Tensor  # (B, T, H) last-layer states of the spatial stage at the image tokens
    features: torch.Tensor  # (B, T, H) the vision features put at those tokens (the language model's input)
    centres: torch.Tensor  # (T, 2) normalised (x, y) centre of each token's cell, raster order


@dataclass
class BoxOutput:
    box: torch.Tensor  # (B, 4) normalised (cx, cy, w, h)
    token_logits: torch.Tensor | None = None  # (B, T) the pointer's scores (ppcr.model.pointer only)
    token_boxes: torch.Tensor | None = None  # (B, T, 4) each token's own box, (cx, cy, w, h)


class MLP(nn.Module):
    """Linear-ReLU-...-Linear, as LISA's projection of the [SEG] hidden state."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BoxHead(nn.Module):
    """SpaSP (the [LOC] hidden state) alone -> normalised box (cx, cy, w, h) in [0, 1] (``model.box_head:
    mlp``, the ablation of :class:`ppcr.model.pointer.PointerBoxHead`; the image tokens are not read)."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.mlp = MLP([hidden, width, width, 4])

    def forward(self, spasp: torch.Tensor, tokens: ImageTokens | None = None) -> BoxOutput:  # (B, H) -> (B, 4)
        return BoxOutput(box=self.mlp(spasp).sigmoid())
