"""The gate head g(x, θ) (docs/method.md, "The gate"; paper Table VI): on a sentence embedding e,
h1 = PReLU(W1 e), h2 = PReLU(W2 h1), dropout, output = softmax(W3 [e; h1; h2]).

    head = GateHead(dim=384, experts=4)
    g = head(e)                      # (batch, experts), rows sum to 1
"""

from __future__ import annotations

import torch
from torch import nn

from moe2.controller.gate.embedding import Encoder


class GateHead(nn.Module):
    def __init__(self, dim: int, experts: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.w1, self.a1 = nn.Linear(dim, hidden), nn.PReLU()
        self.w2, self.a2 = nn.Linear(hidden, hidden), nn.PReLU()
        self.drop = nn.Dropout(dropout)
        self.w3 = nn.Linear(dim + 2 * hidden, experts)

    def logits(self, e: torch.Tensor) -> torch.Tensor:
        h1 = self.a1(self.w1(e))  # (batch, hidden)
        h2 = self.a2(self.w2(h1))  # (batch, hidden)
        return self.w3(self.drop(torch.cat([e, h1, h2], dim=-1)))  # (batch, experts)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.logits(e).softmax(-1)


class Gate(nn.Module):
    """Encoder and head end to end: (input_ids, attention_mask) -> gate values."""

    def __init__(self, encoder: Encoder, head: GateHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask))
