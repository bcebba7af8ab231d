"""Naive loop-for-loop port of the official Q-Net computation (shenqq377/Q-Net ``models/fewshot.py`` and the
query loss of its ``train.py``), written from reading it: one episode, shot, query and feature level at a
time, ``F.interpolate`` for every upsampling, ``F.cosine_similarity``, one Adam per episode and level in the
refinement. The fast model (``models/qnet.py``) is tested against it.

Departure from the official code, as in the fast model: episode ``i`` is thresholded with its own query's
threshold (the official broadcast of all queries' thresholds runs only for batch size 1); with several
queries each is segmented (and refined) on its own and query 0 drives the alignment.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SCALER = 20.0
EPS = torch.finfo(torch.float32).eps


def get_features(fts: Tensor, mask: Tensor) -> Tensor:
    """Masked average of the upsampled features: ``(1, C, h, w)``, ``(1, H, W)`` → ``(1, C)``."""
    fts = F.interpolate(fts, size=mask.shape[-2:], mode="bilinear")
    return torch.sum(fts * mask[None, ...], dim=(-2, -1)) / (mask[None, ...].sum(dim=(-2, -1)) + 1e-5)


def get_pred(fts: Tensor, prototype: Tensor, thresh: Tensor) -> Tensor:
    """``(1, C, h, w)``, ``(1, C)``, 0-d → ``(1, h, w)``."""
    sim = -F.cosine_similarity(fts, prototype[..., None, None], dim=1) * SCALER
    return 1.0 - torch.sigmoid(0.5 * (sim - thresh))


def combine(preds: list[Tensor], size, alpha: float) -> Tensor:
    """Per level ``(1, h, w)`` maps → ``(1, 2, H, W)``."""
    weights = [alpha, 1.0 - alpha]
    up = [F.interpolate(p[None], size=size, mode="bilinear", align_corners=True) for p in preds]
    fg = sum(w * u for w, u in zip(weights, up, strict=True)) / sum(weights)
    return torch.cat((1.0 - fg, fg), dim=1)


def update_prototype(fts: Tensor, prototype: Tensor, pred: Tensor, iters: int, lr: float, thresh: Tensor):
    """``updatePrototype`` for one episode and level: ``fts (1, C, h, w)``, ``prototype (1, C)``,
    ``pred (1, h, w)`` → the refined ``(1, C)``."""
    with torch.inference_mode(False):
        fts = fts.clone()
        thresh = thresh.clone()
        proto = nn.Parameter(prototype.detach().clone())
        pred = pred.clone()
        optimizer = torch.optim.Adam([proto], lr=lr)
        for _ in range(iters):
            with torch.enable_grad():
                pred_mask = torch.stack((1.0 - pred, pred), dim=1).argmax(dim=1, keepdim=True)  # (1, 1, h, w)
                pred_mask = pred_mask.repeat(1, fts.shape[1], 1, 1)
                bg_fts = fts * (1 - pred_mask)
                fg_fts = torch.zeros_like(fts)
                fg_fts += proto[..., None, None].repeat(1, 1, *fts.shape[-2:]) * pred_mask
                new_fts = bg_fts + fg_fts
                fts_norm = torch.sigmoid((fts - fts.min()) / (fts.max() - fts.min()))
                new_norm = torch.sigmoid((new_fts - new_fts.min()) / (new_fts.max() - new_fts.min()))
                loss = nn.BCELoss()(fts_norm, new_norm)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                pred = get_pred(fts, proto, thresh)
    return proto.detach()


def naive_forward(
    levels_of,
    supp_imgs: Tensor,
    supp_masks: Tensor,
    qry_imgs: Tensor,
    train: bool,
    n_iters: int = 0,
    lr: float = 0.01,
    alpha: float = 0.9,
):
    """The official ``FewShotSeg.forward``. ``levels_of``: the encoder, ``(N, 3, H, W)`` → ``(f3, f4, t)``.

    Returns ``probs (B, Q, 2, H, W)`` and the alignment loss (0-d; zero when ``train`` is False).
    """
    b, s = supp_imgs.shape[:2]
    q = qry_imgs.shape[1]
    size = supp_imgs.shape[-2:]
    *levels, tao = levels_of(torch.cat([supp_imgs.flatten(0, 1), qry_imgs.flatten(0, 1)]))
    n_lv = len(levels)
    supp_fts = [f[: b * s].view(b, s, *f.shape[1:]) for f in levels]
    qry_fts = [f[b * s :].view(b, q, *f.shape[1:]) for f in levels]
    t = tao[b * s :].view(b, q)
    align_loss = torch.zeros((), dtype=tao.dtype)
    episodes = []
    for epi in range(b):
        protos = []
        for n in range(n_lv):
            shot_fts = [get_features(supp_fts[n][epi, [shot]], supp_masks[epi, [shot]]) for shot in range(s)]
            protos.append(torch.sum(torch.cat(shot_fts, dim=0), dim=0, keepdim=True) / s)
        queries = []
        for qi in range(q):
            thresh = t[epi, qi]
            preds = [get_pred(qry_fts[n][epi, [qi]], protos[n], thresh) for n in range(n_lv)]
            if not train and n_iters > 0:
                refined = [
                    update_prototype(qry_fts[n][epi, [qi]], protos[n], preds[n], n_iters, lr, thresh)
                    for n in range(n_lv)
                ]
                preds = [get_pred(qry_fts[n][epi, [qi]], refined[n], thresh) for n in range(n_lv)]
            queries.append(combine(preds, size, alpha))
        episodes.append(torch.cat(queries, dim=0))
        if train:
            align_loss = align_loss + align_loss_of(
                [f[epi] for f in supp_fts], [f[epi, [0]] for f in qry_fts], queries[0], supp_masks[epi],
                t[epi, 0], alpha,
            )  # fmt: skip
    return torch.stack(episodes), align_loss / b


def align_loss_of(supp_fts, qry_fts, pred, fore_mask, thresh, alpha):
    """``alignLoss`` of one episode: ``supp_fts`` per level ``(S, C, h, w)``, ``qry_fts`` per level
    ``(1, C, h, w)``, ``pred (1, 2, H, W)``, ``fore_mask (S, H, W)``."""
    n_shots = fore_mask.shape[0]
    pred_mask = pred.argmax(dim=1)  # (1, H, W)
    fg_mask = (pred_mask == 1).to(pred.dtype)
    loss = torch.zeros((), dtype=pred.dtype)
    if fg_mask.sum() == 0:
        return loss
    for shot in range(n_shots):
        protos = [get_features(f, fg_mask[0][None]) for f in qry_fts]
        preds = [get_pred(supp_fts[n][[shot]], protos[n], thresh) for n in range(len(supp_fts))]
        pred_ups = combine(preds, fore_mask.shape[-2:], alpha)
        label = torch.full_like(fore_mask[shot], 255)
        label[fore_mask[shot] == 1] = 1
        label[fore_mask[shot] == 0] = 0
        log_prob = torch.log(torch.clamp(pred_ups, EPS, 1 - EPS))
        loss = loss + nn.NLLLoss()(log_prob, label[None].long()) / n_shots
    return loss


def naive_query_loss(probs: Tensor, labels: Tensor) -> Tensor:
    """The official ``train.py`` query loss: ``probs (B, Q, 2, H, W)``, ``labels (B, Q, H, W)``."""
    criterion = nn.NLLLoss(ignore_index=255, weight=torch.tensor([0.1, 1.0], dtype=probs.dtype))
    log_prob = torch.log(torch.clamp(probs.flatten(0, 1), EPS, 1 - EPS))
    return criterion(log_prob, labels.flatten(0, 1).long())


def naive_training_terms(model: nn.Module, supp: Tensor, masks: Tensor, qry: Tensor, labels: Tensor):
    """The official training forward and loss terms with the encoder of a fast ``QNet``: the naive side of
    ``benchmarks/method_step.py``."""
    probs, align = naive_forward(model.encoder, supp, masks, qry, train=True, alpha=model.alpha)
    query = naive_query_loss(probs, labels)
    return {"query_nll": query, "align_nll": align, "total": query + align}


class TinyLevels(nn.Module):
    """A small stand-in for the ResNet-101 with layer-4 features: ``(N, 3, H, W)`` → ``(N, C, H/4, W/4)``,
    ``(N, C, H/8, W/8)``, ``(N,)``, with a BatchNorm (so that training mode matters)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 4, stride=4), nn.BatchNorm2d(channels), nn.ReLU())
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: Tensor):
        f3 = self.stem(x)
        f4 = self.down(f3)
        return f3, f4, self.head(f4.mean((2, 3))).squeeze(1)
