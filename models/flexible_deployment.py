"""Flexible Deployment (FD, method.md §4.5): deploy the refined prototypes onto each query pixel.

1. ``sim' = cos(F_q, BP')`` → ``(P, h, w)``;
2. ``S = softmax over P of (sim' · (1 + 20·sigmoid(t_s)))``, padded (invalid) prototypes masked out;
3. ``IP = Σ_j BP'_j · S_j`` → ``(C, h, w)``, ``IS = Σ_j sim'_j · S_j`` → ``(1, h, w)``;
4. output ``[F_q, IP, IS]`` → ``(2C+1, h, w)``; with ``extra_maps`` also ``[Σ_j sim'_j, cos(F_q, p)]``
   (``p`` the branch's global prototype) → ``2C+3`` channels, the input the official decoders were built for.

Shape: ``BP' (B, Q, P, C)``, validity ``(B, P)``, ``F_q (B, Q, C, h, w)``, ``t_s (B,)``, ``p (B, C)`` →
``(B, Q, 2C+1, h, w)`` (``2C+3`` with extra maps).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SCALER = 20.0


class FlexibleDeployment(nn.Module):
    """Deployment softmax over the prototype set and the ``[F_q, IP, IS]`` stack (no parameters)."""

    def __init__(self, extra_maps: bool = False, scaler: float = SCALER) -> None:
        super().__init__()
        self.extra_maps = extra_maps
        self.scaler = scaler

    def forward(
        self, refined: Tensor, valid: Tensor, query_feats: Tensor, t_support: Tensor, global_proto: Tensor
    ) -> Tensor:
        """Deploy. Shape: ``(B, Q, P, C)``, ``(B, P)``, ``(B, Q, C, h, w)``, ``(B,)``, ``(B, C)`` →
        ``(B, Q, 2C+1 or 2C+3, h, w)``."""
        b, q, c, h, w = query_feats.shape
        n_query = F.normalize(query_feats.flatten(3), dim=2)  # (B, Q, C, hw)
        sim = torch.matmul(F.normalize(refined, dim=-1), n_query)  # (B, Q, P, hw)
        logits = sim * (1 + self.scaler * torch.sigmoid(t_support))[:, None, None, None]
        logits = logits.masked_fill(~valid[:, None, :, None], float("-inf"))
        weights = torch.softmax(logits, dim=2)
        deployed = torch.matmul(refined.transpose(2, 3), weights)  # (B, Q, C, hw)
        deployed_sim = (sim * weights).sum(2, keepdim=True)  # (B, Q, 1, hw)
        maps = [query_feats.flatten(3), deployed, deployed_sim]
        if self.extra_maps:
            maps.append((sim * valid[:, None, :, None]).sum(2, keepdim=True))
            maps.append(torch.einsum("bc,bqcn->bqn", F.normalize(global_proto, dim=-1), n_query).unsqueeze(2))
        return torch.cat(maps, 2).view(b, q, -1, h, w)
