"""Naive, loop-for-loop port of GMRD's official forward and loss, the reference for the fast model.

Written from reading the official ``FewShotSeg`` (zmcheng9/GMRD): one Python iteration per episode, shot and
alignment shot; the features upsampled to the slice size and filled pixel by pixel with drawn region
features, the descriptor layers applied to the ``(C, H·W)`` matrix, OpenCV's erosion and dilation for the
edge masks, and ``F.cosine_similarity`` / ``F.normalize`` as the official code calls them. It reuses the
parameters of a fast ``GMRD`` (``encoder``, ``mlp1``, ``mlp2``, ``decoder1``, ``decoder2``).

The official draws (``random.sample(range(n_in), k)``) come from ``sample(key, n_in, k)``, ``key`` =
``(phase, episode, shot, region)`` with phase ``'support'`` or ``'align'`` and region ``'fg'`` or ``'bg'``, so
that a test can hand both implementations the same draws. One query per episode, as the official code
asserts. Slow on purpose.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

SCALER = 20.0
Sampler = Callable[[tuple, int, int], list]


def random_sampler(seed: int = 0) -> Sampler:
    """Draws from its own ``random.Random``, as the official code draws from ``random``."""
    rng = random.Random(seed)
    return lambda key, n, k: rng.sample(range(n), k)


def up(fts: Tensor, size) -> Tensor:
    return F.interpolate(fts, size=size, mode="bilinear", align_corners=True)


def masked_mean(fts: Tensor, mask: Tensor) -> Tensor:
    """Shape: ``(C, H, W)``, ``(H, W)`` → ``(C,)`` (the official ``sum / (sum(mask) + 1e-5)``)."""
    return (fts * mask).sum((-2, -1)) / (mask.sum() + 1e-5)


def filled(fts: Tensor, region: Tensor, sample: Sampler, key: tuple) -> Tensor:
    """``get_fg_fts``: outside pixels (raster order) take drawn region pixels' features. Shape:
    ``(C, H, W)``, ``(H, W)`` → ``(C, H, W)``."""
    c, height, width = fts.shape
    inside = [(i, j) for i in range(height) for j in range(width) if region[i, j] == 1]
    outside = [(i, j) for i in range(height) for j in range(width) if region[i, j] != 1]
    n_in, n_pts = len(inside), len(outside)
    out = fts * region
    if n_in == 0:
        return out  # zeros stand outside
    if n_in >= n_pts:
        picks = [inside[k] for k in sample(key, n_in, n_pts)]
    else:
        r = n_pts // n_in
        picks = [inside[k] for k in sample(key, n_in, n_pts % n_in)] + inside * r
    for (i, j), (si, sj) in zip(outside, picks, strict=True):
        out[:, i, j] = fts[:, si, sj]
    return out


def descriptors(model, fts: Tensor, mask: Tensor, region: str, sample: Sampler, key: tuple) -> Tensor:
    """``get_fg_pts`` / ``get_bg_pts``. Shape: ``(1, C, h, w)``, ``(H, W)`` → ``(K + 2, C)``."""
    size = mask.shape[-2:]
    big = up(fts, size)[0]
    m = mask.detach().cpu().numpy()
    kernel = np.ones((3, 3), dtype=np.uint8)
    if region == "fg":
        area = mask
        edge = mask - torch.as_tensor(cv2.erode(m, kernel, iterations=2), device=mask.device)
        mlp = model.mlp1
    else:
        area = 1 - mask
        grown = m if model.edge_masks == "paper" else (1 - mask).detach().cpu().numpy()
        edge = torch.as_tensor(cv2.dilate(grown, kernel, iterations=2), device=mask.device) - mask
        mlp = model.mlp2
    matrix = filled(big, area, sample, key).reshape(big.shape[0], -1)  # (C, H·W)
    generated = mlp.reduce(matrix).t()
    return torch.cat([generated, masked_mean(big, area)[None], masked_mean(big, edge)[None]])


def similarity_logit(decoder, fts: Tensor, protos: Tensor) -> Tensor:
    """``get_fg_sim`` / ``get_bg_sim``. Shape: ``(1, C, h, w)``, ``(P, C)`` → ``(1, 1, h, w)``."""
    f = F.normalize(fts.permute(0, 2, 3, 1), dim=-1)
    p = F.normalize(protos, dim=-1)
    return decoder((f @ p.t()).permute(0, 3, 1, 2))


def threshold_pred(fts: Tensor, proto: Tensor, t: Tensor) -> Tensor:
    """``getPred``. Shape: ``(1, C, h, w)``, ``(C,)``, scalar → ``(1, h, w)``."""
    sim = -F.cosine_similarity(fts, proto[None, :, None, None], dim=1) * SCALER
    return 1.0 - torch.sigmoid(0.5 * (sim - t))


def nll(probs: Tensor, mask: Tensor) -> Tensor:
    """The official alignment criterion: unweighted NLL of ``log(clamp(p))``. ``(1, 2, H, W)``, ``(H, W)``."""
    eps = torch.finfo(torch.float32).eps
    return F.nll_loss(torch.log(torch.clamp(probs, eps, 1 - eps)), mask[None].long())


def naive_forward(model, supp_imgs, supp_masks, qry_imgs, train: bool, sample: Sampler):
    """The official forward. Shape: ``(B, S, 3, H, W)``, ``(B, S, H, W)``, ``(B, 1, 3, H, W)`` →
    ``probs (B, 2, H, W)``, the alignment loss (0-d, summed over episodes / B) and, per episode, the
    alignment predictions ``(S, 2, H, W)`` or None where skipped."""
    b, s = supp_imgs.shape[:2]
    size = supp_imgs.shape[-2:]
    feats, t = model.encoder(torch.cat([supp_imgs.flatten(0, 1), qry_imgs.flatten(0, 1)]))
    outputs, align_preds = [], []
    align_loss = supp_imgs.new_zeros(())
    for e in range(b):
        supp = [feats[e * s + k][None] for k in range(s)]
        qry = feats[b * s + e][None]
        t_q = t[b * s + e]
        masks = [supp_masks[e, k] for k in range(s)]
        empty = sum(float(m.sum()) for m in masks) == 0
        if empty:
            proto = sum(masked_mean(up(f, size)[0], m) for f, m in zip(supp, masks, strict=True)) / s
            fg = up(threshold_pred(qry, proto, t_q)[None], size)
            preds = torch.cat([1.0 - fg, fg], 1)
        else:
            fg_pts = sum(descriptors(model, supp[k], masks[k], "fg", sample, ("support", e, k, "fg"))
                         for k in range(s)) / s  # fmt: skip
            bg_pts = sum(descriptors(model, supp[k], masks[k], "bg", sample, ("support", e, k, "bg"))
                         for k in range(s)) / s  # fmt: skip
            fg = up(similarity_logit(model.decoder1, qry, fg_pts), size)
            bg = up(similarity_logit(model.decoder2, qry, bg_pts), size)
            preds = torch.softmax(torch.cat([bg, fg], 1), 1)
        outputs.append(preds)
        if not train:
            continue
        pred_mask = (preds.argmax(1)[0] == 1).to(preds.dtype)
        if pred_mask.sum() == 0:
            align_preds.append(None)
            continue
        episode_loss, shot_preds = supp_imgs.new_zeros(()), []
        for k in range(s):
            if empty:
                proto = masked_mean(up(qry, size)[0], pred_mask)
                sp = up(threshold_pred(supp[k], proto, t_q)[None], size)
                sp = torch.cat([1.0 - sp, sp], 1)
            else:
                q_fg = descriptors(model, qry, pred_mask, "fg", sample, ("align", e, k, "fg"))
                q_bg = descriptors(model, qry, pred_mask, "bg", sample, ("align", e, k, "bg"))
                fg = up(similarity_logit(model.decoder1, supp[k], q_fg), size)
                bg = up(similarity_logit(model.decoder2, supp[k], q_bg), size)
                sp = torch.softmax(torch.cat([bg, fg], 1), 1)
            shot_preds.append(sp[0])
            episode_loss = episode_loss + nll(sp, masks[k]) / s
        align_preds.append(torch.stack(shot_preds))
        align_loss = align_loss + episode_loss
    return torch.cat(outputs), align_loss / b, align_preds


def naive_query_loss(probs: Tensor, labels: Tensor) -> Tensor:
    """train.py's query criterion: NLL with class weights [0.1, 1.0], ignore index 255, one mean over all
    pixels. Shape: ``(B, 2, H, W)``, ``(B, H, W)`` → 0-d."""
    eps = torch.finfo(torch.float32).eps
    weight = torch.tensor([0.1, 1.0], dtype=probs.dtype)
    log_p = torch.log(torch.clamp(probs, eps, 1 - eps))
    return F.nll_loss(log_p, labels.long(), weight=weight, ignore_index=255)
