"""Interactive Fusion Refinement (IFR, method.md §4.4): refine a basis set with prototypes read off each
query.

For every query independently:

1. ``sim = cos(F_q, BP)`` → ``(P, h, w)``;
2. pseudo masks ``A = sigmoid(sim · (1 + 20·sigmoid(t_q)))``;
3. query prototypes ``q_j = Σ F_q·A_j / (Σ A_j + 1e-5)`` → ``(P, C)``;
4. fusion factor ``φ = sigmoid(mean over (support pixels with downsampled mask > 0) × (all query pixels) of
   cos(F_s[i], F_q[j]))``, 0 when the downsampled branch mask has no positive value. The mean over all pairs
   equals ``mean_i(n_s[i]) · mean_j(n_q[j])`` with ``n`` the L2-normalised features (exact algebra), so the
   ``(h·w)²`` similarity matrix is never formed;
5. ``BP' = BP + fuse([BP·(1-φ), q·φ]) = BP + w0·(1-φ)·BP + w1·φ·q``.

The module *is* the official ``fuse`` 1×1 ``Conv2d(2, 1, bias=False)`` (so its weight keeps the checkpoint
name ``fuse.weight`` and the default Conv2d initialisation) and adds the refinement as its ``forward``.

Shape: ``BP (B, P, C)``, ``F_q (B, Q, C, h, w)``, ``t_q (B, Q)``, ``F_s (B, S, C, h, w)``, branch masks
``(B, S, H, W)`` → ``BP' (B, Q, P, C)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.prototypes import MAP_EPS

SCALER = 20.0


def fusion_factor(support_feats: Tensor, branch_masks: Tensor, query_feats: Tensor) -> Tensor:
    """Fusion factor ``φ`` of every (episode, query).

    ``branch_masks`` are downsampled to ``h×w`` (bilinear, ``align_corners=False``); the support pixels with a
    positive value over all given shots are averaged. Shape: ``F_s (B, S, C, h, w)``, masks ``(B, S, H, W)``,
    ``F_q (B, Q, C, h, w)`` → ``(B, Q)``.
    """
    b, s, c, h, w = support_feats.shape
    small = F.interpolate(
        branch_masks.flatten(0, 1).unsqueeze(1).to(support_feats.dtype),
        size=(h, w),
        mode="bilinear",
        align_corners=False,
    ).view(b, s, h, w)
    selected = (small > 0).to(support_feats.dtype)
    n_support = F.normalize(support_feats, dim=2)
    count = selected.sum((1, 2, 3))  # (B,)
    mean_support = torch.einsum("bschw,bshw->bc", n_support, selected) / count.clamp(min=1).unsqueeze(1)
    mean_query = F.normalize(query_feats, dim=2).mean((3, 4))  # (B, Q, C)
    cos_mean = torch.einsum("bc,bqc->bq", mean_support, mean_query)
    return torch.where(count.unsqueeze(1) > 0, torch.sigmoid(cos_mean), torch.zeros_like(cos_mean))


class InteractiveFusionRefinement(nn.Conv2d):
    """IFR with its 1×1 fuse convolution (weights ``w0``, ``w1``). See the module docstring for the steps."""

    def __init__(self, scaler: float = SCALER) -> None:
        super().__init__(2, 1, kernel_size=1, bias=False)
        self.scaler = scaler

    def forward(  # type: ignore[override]
        self,
        basis: Tensor,
        query_feats: Tensor,
        t_query: Tensor,
        support_feats: Tensor,
        branch_masks: Tensor,
    ) -> Tensor:
        """Refine ``basis`` once per query. Shape: ``(B, P, C)``, ``(B, Q, C, h, w)``, ``(B, Q)``,
        ``(B, S, C, h, w)``, ``(B, S, H, W)`` → ``(B, Q, P, C)``."""
        fq = query_feats.flatten(3)  # (B, Q, C, hw)
        sim = torch.matmul(F.normalize(basis, dim=-1).unsqueeze(1), F.normalize(fq, dim=2))  # (B, Q, P, hw)
        pseudo = torch.sigmoid(sim * (1 + self.scaler * torch.sigmoid(t_query))[..., None, None])
        query_protos = torch.matmul(pseudo, fq.transpose(2, 3)) / (pseudo.sum(-1, keepdim=True) + MAP_EPS)
        phi = fusion_factor(support_feats, branch_masks, query_feats)[..., None, None]  # (B, Q, 1, 1)
        w0, w1 = self.weight.flatten()
        base = basis.unsqueeze(1)
        return base + w0 * (base * (1 - phi)) + w1 * (query_protos * phi)
