"""The small trained heads around the MLLM."""

from __future__ import annotations

import torch
from torch import nn


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
    """SpaSP (the [LOC] hidden state) -> normalised box (cx, cy, w, h) in [0, 1]."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.mlp = MLP([hidden, width, width, 4])

    def forward(self, spasp: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, 4)
        return self.mlp(spasp).sigmoid()
