"""Naive, loop-for-loop port of SSL-ALPNet's official forward and loss (``FewShotSeg`` of
cheng-01037/Self-supervised-Fewshot-Medical-Image-Segmentation, ``models/grid_proto_fewshot.py``, its
classifier ``MultiProtoAsConv`` in ``models/alpmodule.py``, and the loss of its ``training.py``), the
reference for the fast ``models.ssl_alpnet.SSLALPNet``; and the official module tree.

Written from reading the official code, one episode (the official batch size is 1) and one query at a
time: the masks resized with ``F.interpolate``; the classifier's three modes as the official computes them
(``avg_pool2d``, the cells ``> 0.95`` picked by boolean indexing, ``safe_norm``, ``F.conv2d`` of the
normalised query with the prototypes as 1×1 kernels, ``Σ softmax·d``; ``'mask'`` through
``F.cosine_similarity``), the foreground's mode chosen by ``avg_pool2d(mask, 4).max() >= 0.95``; the
alignment shot by shot from the argmax of the feature-size scores with the episode's queries as the
support; the query loss a class-weighted ``cross_entropy``. Where the official ``F.conv2d`` fails (no
background prototype) the episode is skipped, as the official training loop skips the batch.

It is slow on purpose; it lives in ``tests/``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tests.naive_adnet import OfficialEncoder

SCALER = 20.0
THRESH = 0.95


class OfficialTree(nn.Module):
    """What the official model owns: ``encoder`` (``cls_unit`` holds only an ``AvgPool2d``: no tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = OfficialEncoder()


class NoPrototype(Exception):
    """The official ``F.conv2d`` with no kernel: the official training skips the batch."""


def _safe_norm(x: Tensor) -> Tensor:
    norm = torch.norm(x, p=2, dim=1)
    norm = torch.max(norm, torch.ones_like(norm) * 1e-4)
    return x.div(norm.unsqueeze(1).expand_as(x))


def cls_unit(qry: Tensor, sup_x: Tensor, sup_y: Tensor, mode: str, window: int) -> Tensor:
    """``MultiProtoAsConv.forward``: ``qry (1, C, h, w)``, ``sup_x (S, C, h, w)``, ``sup_y (S, 1, h, w)`` →
    ``(1, 1, h, w)``."""
    if mode == "mask":
        proto = torch.sum(sup_x * sup_y, dim=(-1, -2)) / (sup_y.sum(dim=(-1, -2)) + 1e-5)
        proto = proto.mean(dim=0, keepdim=True)
        return (F.cosine_similarity(qry, proto[..., None, None], dim=1, eps=1e-4) * SCALER).unsqueeze(1)
    nshot, nch = sup_x.shape[:2]
    cells = F.avg_pool2d(sup_x, window)
    cell_y = F.avg_pool2d(sup_y, window)
    protos = []
    for shot in range(nshot):
        for i in range(cells.shape[2]):
            for j in range(cells.shape[3]):
                if cell_y[shot, 0, i, j] > THRESH:
                    protos.append(cells[shot, :, i, j])
    if mode == "gridconv+":
        for shot in range(nshot):
            protos.append((sup_x[shot] * sup_y[shot]).sum((1, 2)) / (sup_y[shot].sum() + 1e-5))
    if not protos:
        raise NoPrototype
    pro_n = _safe_norm(torch.stack(protos))
    dists = F.conv2d(_safe_norm(qry), pro_n[..., None, None]) * SCALER
    return torch.sum(F.softmax(dists, dim=1) * dists, dim=1, keepdim=True)


def _fg_mode(mask: Tensor) -> str:
    return "gridconv+" if F.avg_pool2d(mask, 4).max() >= THRESH else "mask"


def _two_scores(qry: Tensor, sup_x: Tensor, fg: Tensor, bg: Tensor, window: int) -> Tensor:
    bg_score = cls_unit(qry, sup_x, bg, "gridconv", window)
    fg_score = cls_unit(qry, sup_x, fg, _fg_mode(fg), window)
    return torch.cat([bg_score, fg_score], dim=1)  # (1, 2, h, w)


def naive_forward(
    encoder: nn.Module,
    supp: Tensor,
    masks: Tensor,
    qry: Tensor,
    train: bool,
    train_window: int = 4,
    val_wsize: int = 2,
) -> tuple[Tensor, Tensor, Tensor]:
    """The official forward on our layout: ``supp (B, S, 3, H, W)``, ``masks (B, S, H, W)``, ``qry (B, Q,
    3, H, W)`` → query scores ``(B, Q, 2, H, W)`` (zeros for a skipped episode), the alignment loss of
    each episode ``(B,)`` (0 when ``train`` is False) and ``valid (B,)``."""
    b, s = supp.shape[:2]
    q = qry.shape[1]
    size = supp.shape[-2:]
    imgs = [supp[i, shot] for shot in range(s) for i in range(b)] + [
        qry[i, n] for n in range(q) for i in range(b)
    ]
    fts = encoder(torch.stack(imgs))
    fsize = fts.shape[-2:]
    window = train_window if train else val_wsize
    scores = torch.zeros(b, q, 2, *size, dtype=fts.dtype)
    align = torch.zeros(b, dtype=fts.dtype)
    valid = torch.ones(b, dtype=torch.bool)
    for i in range(b):
        sup_x = torch.stack([fts[shot * b + i] for shot in range(s)])  # (S, C, h, w)
        fore = masks[i].to(fts.dtype)[:, None]
        fg = F.interpolate(fore, size=fsize, mode="bilinear")
        bg = F.interpolate(1.0 - fore, size=fsize, mode="bilinear")
        qry_fts = [fts[b * s + n * b + i][None] for n in range(q)]
        try:
            small = [_two_scores(qry_fts[n], sup_x, fg, bg, window) for n in range(q)]
            if train:
                # Alignment: the episode's queries, masked by their argmax, as the support of each shot.
                pred_mask = torch.cat(small).argmax(dim=1)[:, None]  # (Q, 1, h, w)
                q_x = torch.cat(qry_fts)
                q_fg = (pred_mask == 1).to(fts.dtype)
                q_bg = (pred_mask == 0).to(fts.dtype)
                loss = torch.zeros((), dtype=fts.dtype)
                for shot in range(s):
                    pred = _two_scores(sup_x[shot : shot + 1], q_x, q_fg, q_bg, train_window)
                    pred = F.interpolate(pred, size=size, mode="bilinear")
                    label = torch.full(size, 255, dtype=torch.long)
                    label[masks[i, shot] == 1] = 1
                    label[masks[i, shot] == 0] = 0
                    loss = loss + F.cross_entropy(pred, label[None], ignore_index=255) / s
                align[i] = loss
        except NoPrototype:
            valid[i] = False
            continue
        for n in range(q):
            scores[i, n] = F.interpolate(small[n], size=size, mode="bilinear")[0]
    return scores, align, valid


def naive_losses(
    scores: Tensor, align: Tensor, valid: Tensor, qry_labels: Tensor, use_wce: bool = True
) -> dict[str, Tensor]:
    """The official loss terms over the episodes kept: ``CrossEntropyLoss(weight=[0.05, 1], ignore 255)``
    of the queries, the alignment loss (averaged over the kept episodes), ``total`` their sum."""
    weight = torch.tensor([0.05, 1.0] if use_wce else [1.0, 1.0], dtype=scores.dtype)
    keep = [i for i in range(scores.shape[0]) if valid[i]]
    if not keep:  # the official loop skips the batch
        zero = scores.sum() * 0.0
        return {"query_ce": zero, "align_ce": zero, "total": zero}
    flat = torch.cat([scores[i, n][None] for n in range(scores.shape[1]) for i in keep])
    labels = torch.cat([qry_labels[i, n][None] for n in range(scores.shape[1]) for i in keep]).long()
    query = F.cross_entropy(flat, labels, weight=weight, ignore_index=255)
    align_ce = sum(align[i] for i in keep) / len(keep)
    return {"query_ce": query, "align_ce": align_ce, "total": query + align_ce}


def naive_training_terms(model: nn.Module, supp: Tensor, masks: Tensor, qry: Tensor, labels: Tensor):
    """The official training forward and loss terms with the parameters of a fast ``SSLALPNet``."""
    scores, align, valid = naive_forward(model.encoder, supp, masks, qry, True, model.train_window)
    return naive_losses(scores, align, valid, labels)
