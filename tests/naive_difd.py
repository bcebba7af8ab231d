"""Naive, loop-for-loop port of the DIFD head and losses (method.md §4), the reference for the fast model.

Written from the specification: one Python iteration per episode, shot, query, SI window and RI box, direct
slicing and summing as the official implementation does, the fusion factor from the full ``(h·w)²``
similarity matrix, and its own seeded generators for the official draws (a torch CPU ``Generator`` and a
``random.Random``, never the process-wide RNGs). It reuses the parameters of a fast ``DIFD`` model
(``encoder``, ``fuse``, ``decoder1``, ``decoder2``) so both compute with the same weights.

It is slow on purpose; it lives in ``tests/`` and is also timed by ``benchmarks/model.py``.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor
from torch.nn import functional as F

SEED = 9
SCALER = 20.0

#: Tolerance of the float64 comparisons of the fast model with this port (tests/test_model*.py).
F64_TOL = {"atol": 1e-9, "rtol": 1e-7}


def naive_boxes(height: int, width: int, seed: int = SEED) -> list[tuple[int, int, int, int, Tensor]]:
    """The 100 RI boxes: ``(row0, row1, col0, col1, area)`` with ``area`` the float32 box area tensor."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    num = 100
    ratios = torch.rand(num, generator=gen) * 1.5 + 0.5
    small = ratios[ratios <= 1]
    u_small = torch.rand(small.numel(), generator=gen)
    heights_small = ((u_small * 0.9375 + 0.0625) * (height * small)).int()
    widths_small = (heights_small / small).int()
    large = ratios[ratios > 1]
    u_large = torch.rand(large.numel(), generator=gen)
    widths_large = ((u_large * 0.9375 + 0.0625) * (width / large)).int()
    heights_large = (widths_large * large).int()
    heights = torch.cat([heights_small, heights_large])
    widths = torch.cat([widths_small, widths_large])
    rows = (torch.rand(num, generator=gen) * (height - heights)).int()
    cols = (torch.rand(num, generator=gen) * (width - widths)).int()
    boxes = []
    for i in range(num):
        r0 = min(max(int(rows[i]), 0), height)
        r1 = min(max(int(rows[i] + heights[i]), 0), height)
        c0 = min(max(int(cols[i]), 0), width)
        c1 = min(max(int(cols[i] + widths[i]), 0), width)
        boxes.append((r0, r1, c0, c1, torch.tensor(float((r1 - r0) * (c1 - c0)))))
    return boxes


def masked_average(fts: Tensor, mask: Tensor) -> Tensor:
    """MAP. Shape: ``(C, h', w')``, ``(h', w')`` → ``(C,)``."""
    return (fts * mask).sum((-2, -1)) / (mask.sum() + 1e-5)


def naive_di(fts: Tensor, mask: Tensor, fg_on: bool, seed: int = SEED) -> tuple[Tensor, Tensor]:
    """DI of one upsampled support image.

    Shape: ``(C, H, W)``, ``(H, W)`` → fg ``(Pf, C)``, bg ``(Pb, C)``.
    """
    c, height, width = fts.shape
    mask32 = mask.float()
    n_fg = mask32.sum()
    n_bg = height * width - n_fg
    fg = [(fts * mask).sum((-2, -1)) / (n_fg + 1e-5)]
    bg = [(fts * (1 - mask)).sum((-2, -1)) / (n_bg + 1e-5)]
    rng = random.Random(seed)

    def pixel_fallback(selector: Tensor) -> list[Tensor]:
        where = [i for i, v in enumerate(selector.flatten().tolist()) if v]
        if len(where) > 100:
            rng.seed(seed)
            where = [where[k] for k in rng.sample(range(len(where)), 100)]
        flat = fts.reshape(c, -1)
        return [flat[:, i] for i in where]

    fg_windows, bg_windows = [], []
    for r in range(0, height - 16 + 1, 8):
        for col in range(0, width - 8 + 1, 8):
            win_f = fts[:, r : r + 16, col : col + 8]
            win_m = mask[r : r + 16, col : col + 8]
            n1 = win_m.float().sum()
            n0 = (1 - win_m.float()).sum()
            if fg_on and n1 >= min(16 * 8 * 0.95, n_fg / 150):
                fg_windows.append(masked_average(win_f, win_m))
            if n0 >= min(16 * 8, n_bg / 250):
                bg_windows.append(masked_average(win_f, 1 - win_m))
    if fg_on:
        if not fg_windows:
            fg_windows = pixel_fallback(mask32 == 1)
        elif len(fg_windows) > 150:
            fg_windows = [fg_windows[k] for k in rng.sample(range(len(fg_windows)), 150)]
    if not bg_windows:
        bg_windows = pixel_fallback((1 - mask32) == 1)
    elif len(bg_windows) > 250:
        bg_windows = [bg_windows[k] for k in rng.sample(range(len(bg_windows)), 250)]
    fg += fg_windows
    bg += bg_windows

    for r0, r1, c0, c1, area in naive_boxes(height, width, seed):
        box_f = fts[:, r0:r1, c0:c1]
        box_m = mask[r0:r1, c0:c1]
        n1 = box_m.float().sum()
        n0 = (1 - box_m.float()).sum()
        if n1 >= min(area * 0.95, n_fg / 100) and n1 < n_fg:
            fg.append(masked_average(box_f, box_m))
        if n0 >= min(area, n_bg / 100) and n0 < n_bg:
            bg.append(masked_average(box_f, 1 - box_m))
    return torch.stack(fg), torch.stack(bg)


def naive_ifr_fd(
    basis: Tensor,
    proto: Tensor,
    qry: Tensor,
    supports: list[Tensor],
    branch_masks: list[Tensor],
    t_pseudo: Tensor,
    t_deploy: Tensor,
    fuse_weight: Tensor,
    extra_maps: bool,
) -> Tensor:
    """IFR then FD for one query. Shape: basis ``(P, C)``, proto ``(C,)``, qry ``(C, h, w)``, supports
    ``[(C, h, w)]``, branch masks ``[(H, W)]`` → ``(2C+1 or 2C+3, h, w)``."""
    c, h, w = qry.shape
    q_pix = F.normalize(qry.reshape(c, -1).t(), dim=1)  # (hw, C)
    sim = q_pix @ F.normalize(basis, dim=1).t()  # (hw, P)
    pseudo = torch.sigmoid(sim * (1 + SCALER * torch.sigmoid(t_pseudo)))
    q_protos = (pseudo.t() @ qry.reshape(c, -1).t()) / (pseudo.sum(0).unsqueeze(1) + 1e-5)  # (P, C)

    rows = []
    for sup, m in zip(supports, branch_masks, strict=True):
        small = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False).flatten()
        pair_cos = F.normalize(sup.reshape(c, -1).t(), dim=1) @ q_pix.t()  # (hw_s, hw_q)
        rows.append(pair_cos[small > 0])
    selected = torch.cat(rows)
    phi = torch.sigmoid(selected.mean()) if selected.shape[0] > 0 else qry.new_zeros(())
    stacked = torch.stack([basis * (1 - phi), q_protos * phi])[None]  # (1, 2, P, C)
    refined = basis + F.conv2d(stacked, fuse_weight)[0, 0]

    sim2 = q_pix @ F.normalize(refined, dim=1).t()  # (hw, P)
    weights = torch.softmax(sim2 * (1 + SCALER * torch.sigmoid(t_deploy)), dim=1)
    deployed = (weights @ refined).t().reshape(c, h, w)
    deployed_sim = (sim2 * weights).sum(1).reshape(1, h, w)
    maps = [qry, deployed, deployed_sim]
    if extra_maps:
        maps.append(sim2.sum(1).reshape(1, h, w))
        maps.append((q_pix @ F.normalize(proto, dim=0)).reshape(1, h, w))
    return torch.cat(maps)


def naive_segment(
    model,
    supports: list[Tensor],
    masks: list[Tensor],
    queries: list[Tensor],
    t_pseudo: list[Tensor],
    t_deploy: Tensor,
    size: tuple[int, int],
    multi_shot: str,
    extra_maps: bool,
    seed: int = SEED,
) -> Tensor:
    """Head for one episode. Shape: supports ``[(C, h, w)] × S``, masks ``[(H, W)] × S``, queries
    ``[(C, h, w)] × Q`` → ``(Q, 2, H, W)``."""
    fg_on = any(bool(m.sum() > 0) for m in masks)
    used = 1 if multi_shot == "official" else len(supports)
    fg_sets, bg_sets = [], []
    proto_fg, proto_bg = [], []
    for k, (sup, m) in enumerate(zip(supports, masks, strict=True)):
        up = F.interpolate(sup[None], size=size, mode="bilinear", align_corners=True)[0]
        proto_fg.append(masked_average(up, m))
        proto_bg.append(masked_average(up, 1 - m))
        if k < used:
            fg_set, bg_set = naive_di(up, m, fg_on, seed)
            fg_sets.append(fg_set)
            bg_sets.append(bg_set)
    proto_fg = torch.stack(proto_fg).mean(0)
    proto_bg = torch.stack(proto_bg).mean(0)
    weight = model.fuse.weight
    outs = []
    for qi, qry in enumerate(queries):
        fg_in = naive_ifr_fd(
            torch.cat(fg_sets),
            proto_fg,
            qry,
            supports[:used],
            masks[:used],
            t_pseudo[qi],
            t_deploy,
            weight,
            extra_maps,
        )
        bg_in = naive_ifr_fd(
            torch.cat(bg_sets),
            proto_bg,
            qry,
            supports[:used],
            [1 - m for m in masks[:used]],
            t_pseudo[qi],
            t_deploy,
            weight,
            extra_maps,
        )
        fg_logit = model.decoder1(fg_in[None])
        bg_logit = model.decoder2(bg_in[None])
        fg_logit = F.interpolate(fg_logit, size=size, mode="bilinear", align_corners=True)
        bg_logit = F.interpolate(bg_logit, size=size, mode="bilinear", align_corners=True)
        outs.append(torch.softmax(torch.cat([bg_logit, fg_logit], 1), dim=1)[0])
    return torch.stack(outs)


def naive_forward(
    model,
    supp_imgs: Tensor,
    supp_masks: Tensor,
    qry_imgs: Tensor,
    align: bool,
    multi_shot: str = "official",
    extra_maps: bool = False,
    seed: int = SEED,
) -> tuple[Tensor, list[Tensor | None] | None]:
    """Naive DIFD forward. Returns ``query_probs (B, Q, 2, H, W)`` and, with ``align``, a per-episode list of
    ``(S, 2, H, W)`` support predictions (``None`` for a skipped episode: empty predicted query mask)."""
    b, s, _, height, width = supp_imgs.shape
    q = qry_imgs.shape[1]
    size = (height, width)
    # Encoder batch in the official order: shot-major supports, then the queries.
    images = torch.cat([supp_imgs[:, k] for k in range(s)] + [qry_imgs[:, j] for j in range(q)])
    feats, t = model.encoder(images)
    query_probs, support_probs = [], []
    for e in range(b):
        sup_f = [feats[k * b + e] for k in range(s)]
        qry_f = [feats[(s + j) * b + e] for j in range(q)]
        t_s = t[e]
        t_q = [t[(s + j) * b + e] for j in range(q)]
        masks = [supp_masks[e, k].to(feats.dtype) for k in range(s)]
        probs = naive_segment(model, sup_f, masks, qry_f, t_q, t_s, size, multi_shot, extra_maps, seed)
        query_probs.append(probs)
        if not align:
            continue
        n_align = 1 if multi_shot == "official" else q
        pred = [probs[j].argmax(0).to(feats.dtype) for j in range(n_align)]
        if sum(float(p.sum()) for p in pred) == 0:
            support_probs.append(None)
            continue
        support_probs.append(
            naive_segment(
                model, qry_f[:n_align], pred, sup_f, [t_q[0]] * s, t_s, size, multi_shot, extra_maps, seed
            )
        )
    return torch.stack(query_probs), (support_probs if align else None)


def naive_boundary_loss(probs: Tensor, labels: Tensor) -> Tensor:
    """Boundary F1 loss (θ0 = 3, θ = 5), mean over classes and images.

    Shape: ``(N, K, H, W)``, ``(N, H, W)`` → ``()``.
    """
    n, k = probs.shape[:2]
    one_hot = torch.eye(k, dtype=probs.dtype, device=probs.device)[labels].permute(0, 3, 1, 2)
    gt_b = F.max_pool2d(1 - one_hot, 3, stride=1, padding=1) - (1 - one_hot)
    pred_b = F.max_pool2d(1 - probs, 3, stride=1, padding=1) - (1 - probs)
    gt_ext = F.max_pool2d(gt_b, 5, stride=1, padding=2)
    pred_ext = F.max_pool2d(pred_b, 5, stride=1, padding=2)
    losses = []
    for i in range(n):
        for cls in range(k):
            p = (pred_b[i, cls] * gt_ext[i, cls]).sum() / (pred_b[i, cls].sum() + 1e-7)
            r = (pred_ext[i, cls] * gt_b[i, cls]).sum() / (gt_b[i, cls].sum() + 1e-7)
            losses.append(1 - 2 * p * r / (p + r + 1e-7))
    return torch.stack(losses).mean()


def naive_losses(
    query_probs: Tensor, support_probs: list[Tensor | None] | None, qry_labels: Tensor, supp_masks: Tensor
) -> dict[str, Tensor]:
    """The four loss terms (weights 1) the official training computes, episode by episode."""
    eps = torch.finfo(torch.float32).eps
    weight = torch.tensor([0.1, 1.0], dtype=query_probs.dtype, device=query_probs.device)
    b, q = query_probs.shape[:2]
    flat = query_probs.flatten(0, 1)
    labels = qry_labels.flatten(0, 1)
    terms = {
        "query_nll": F.nll_loss(torch.log(flat.clamp(eps, 1 - eps)), labels, weight=weight, ignore_index=255),
        "query_boundary": naive_boundary_loss(flat, labels),
    }
    align_nll = query_probs.new_zeros(())
    align_b = query_probs.new_zeros(())
    for e, probs in enumerate(support_probs or []):
        if probs is None:
            continue
        s = probs.shape[0]
        for k in range(s):
            label = supp_masks[e, k].long()
            p = probs[k : k + 1]
            align_nll = (
                align_nll + F.nll_loss(torch.log(p.clamp(eps, 1 - eps)), label[None], weight=weight) / s
            )
            align_b = align_b + naive_boundary_loss(p, label[None]) / s
    terms["align_nll"] = align_nll / b
    terms["align_boundary"] = align_b / b
    terms["total"] = (
        terms["query_nll"] + terms["align_nll"] + terms["query_boundary"] + terms["align_boundary"]
    )
    return terms
