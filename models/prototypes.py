"""Parts every prototype method of the lineage shares (SSL-ALPNet → ADNet → Q-Net → GMRD → DIFD): masked
average pooling of upsampled features without forming them, and cosine maps against prototypes.

Masked pooling: the official codes upsample the ``(C, h, w)`` features bilinearly to the mask's ``H x W`` and
sum them under the mask; the same sum is ``F`` contracted with ``U_hᵀ M U_w``, where ``U`` is the 1-D
bilinear upsampling matrix (``align_corners`` as the official code calls ``F.interpolate``: True in
DIFD and GMRD, False — torch's default — in ADNet and Q-Net), so the ``(C, H, W)`` tensor is never made.

Shape glossary: ``N`` images, ``C`` channels, ``h w`` feature size, ``H W`` image size, ``P`` prototypes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

#: The ``+ 1e-5`` of every official masked average.
MAP_EPS = 1e-5


def bilinear_weights(out_size: int, in_size: int, device: torch.device, align_corners: bool = True) -> Tensor:
    """Matrix ``U (out, in)`` of 1-D bilinear resizing (float64), so that
    ``F.interpolate(F, (H, W), mode='bilinear', align_corners=a) = U_h F U_wᵀ`` per channel."""
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = torch.arange(out_size, dtype=torch.float64, device=device) * scale
    else:  # torch's half-pixel rule, source indices clamped at 0
        scale = in_size / out_size
        src = ((torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).clamp(min=0)
    lo = src.floor().clamp(max=in_size - 1)
    frac = src - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=in_size - 1)
    u = torch.zeros(out_size, in_size, dtype=torch.float64, device=device)
    rows = torch.arange(out_size, device=device)
    u.index_put_((rows, lo), 1 - frac, accumulate=True)
    u.index_put_((rows, hi), frac, accumulate=True)
    return u


def masked_sum(features: Tensor, masks: Tensor, align_corners: bool = True) -> Tensor:
    """``Σ_x up(F)[:, x]·M[x]`` without forming the upsampled features: ``F`` contracted with ``U_hᵀ M U_w``.

    Shape: ``features (N, C, h, w)``, ``masks (N, H, W)`` → ``(N, C)``.
    """
    h, w = features.shape[-2:]
    height, width = masks.shape[-2:]
    u_h = bilinear_weights(height, h, features.device, align_corners)
    u_w = bilinear_weights(width, w, features.device, align_corners)
    kernel = (u_h.t() @ masks.double() @ u_w).to(features.dtype)  # (N, h, w)
    return torch.einsum("nchw,nhw->nc", features, kernel)


def masked_average(
    features: Tensor, masks: Tensor, align_corners: bool = True, eps: float = MAP_EPS
) -> Tensor:
    """Masked average pooling of the upsampled features, ``Σ up(F)·M / (Σ M + eps)`` (the official
    ``getFeatures``). Shape: ``features (N, C, h, w)``, ``masks (N, H, W)`` → ``(N, C)``."""
    area = masks.sum((-2, -1)).to(features.dtype).unsqueeze(-1)
    return masked_sum(features, masks, align_corners) / (area + eps)


def cosine_map(features: Tensor, prototypes: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of every feature vector with every prototype, as ``F.cosine_similarity`` computes
    it (each norm clamped at ``eps``). Shape: ``features (N, C, h, w)``, ``prototypes (N, P, C)`` →
    ``(N, P, h, w)``."""
    f_norm = features.norm(dim=1, keepdim=True).clamp_min(eps)  # (N, 1, h, w)
    p_norm = prototypes.norm(dim=-1, keepdim=True).clamp_min(eps)  # (N, P, 1)
    dots = torch.einsum("nchw,npc->nphw", features, prototypes)
    return dots / (f_norm * p_norm.unsqueeze(-1))


def upsample(x: Tensor, size: tuple[int, int], align_corners: bool = True) -> Tensor:
    """Bilinear resize of ``(N, K, h, w)`` maps to ``size``."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
