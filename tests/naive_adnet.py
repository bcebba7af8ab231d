"""Naive, loop-for-loop port of ADNet's official forward and loss (``FewShotSeg`` of sha168/ADNet,
``models/fewshot_anom.py``, and the loss of its ``main_train.py``), the reference for the fast
``models.adnet.ADNet``; and the official module tree, rebuilt from torchvision as the official encoder builds
it, so that "an official checkpoint" in the tests is what the official training saves.

Written from reading the official code: the episode batch in the official order (ways, shots, episodes;
then queries, episodes) through the encoder, then one Python iteration per episode, shot and query:
``F.interpolate`` of each support's features to the mask size and a masked sum (``getFeatures``), the
prototype as the sum over shots divided by their number, ``-20·F.cosine_similarity`` (``negSim``), ``1 -
σ(½(S - t))`` (``getPred``), the prediction upsampled with ``align_corners=True``; the alignment from the
argmax of ``[1 - p, p]`` at the feature size, the query prototype over all queries of the episode, one
``NLLLoss`` per support slice; the query loss a class-weighted ``NLLLoss`` over all queries.

It is slow on purpose; it lives in ``tests/``.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

SCALER = 20.0
EPS = 1e-5


class OfficialEncoder(nn.Module):
    """The official ``TVDeeplabRes101Encoder``: torchvision's DeepLabV3-ResNet101 trunk (its
    ``IntermediateLayerGetter``, layer4 → ``'out'``), ``localconv`` (2048 → 256), the unused ``asppconv`` and
    ``aspp_out`` (DeepLabV3's ASPP and the head's first 3×3 convolution)."""

    def __init__(self) -> None:
        super().__init__()
        model = torchvision.models.segmentation.deeplabv3_resnet101(
            weights=None, weights_backbone=None, num_classes=21, aux_loss=None
        )
        children = list(model.children())
        self.backbone = children[0]
        self.localconv = nn.Conv2d(2048, 256, kernel_size=1, stride=1, bias=False)
        self.asppconv = nn.Conv2d(256, 256, kernel_size=1, bias=False)
        self.aspp_out = nn.Sequential(children[1][0], children[1][1])

    def forward(self, x: Tensor) -> Tensor:
        return self.localconv(self.backbone(x)["out"])


class OfficialTree(nn.Module):
    """What the official model owns: ``encoder`` and the threshold ``t`` (its ``NLLLoss`` has no weight
    buffer). The official training wraps it in ``nn.DataParallel``: its checkpoints' keys start
    ``module.``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = OfficialEncoder()
        self.t = nn.Parameter(torch.tensor([-10.0]))


def _pred(sim: Tensor, t: Tensor) -> Tensor:
    return 1.0 - torch.sigmoid(0.5 * (sim - t))


def _neg_sim(fts: Tensor, prototype: Tensor) -> Tensor:
    return -F.cosine_similarity(fts, prototype[..., None, None], dim=1) * SCALER


def _log(p: Tensor) -> Tensor:
    eps = torch.finfo(torch.float32).eps
    return torch.log(torch.clamp(p, eps, 1 - eps))


def naive_forward(
    encoder: nn.Module, t: Tensor, supp: Tensor, masks: Tensor, qry: Tensor, train: bool
) -> tuple[Tensor, Tensor]:
    """The official forward on our layout: ``supp (B, S, 3, H, W)``, ``masks (B, S, H, W)``, ``qry (B, Q, 3,
    H, W)`` → ``query_probs (B, Q, 2, H, W)`` and the alignment loss (the official ``align_loss / B``; 0
    when ``train`` is False)."""
    b, s = supp.shape[:2]
    q = qry.shape[1]
    size = supp.shape[-2:]
    # Official batch order: supports shot-major over episodes, then queries query-major.
    imgs = [supp[i, shot] for shot in range(s) for i in range(b)] + [
        qry[i, n] for n in range(q) for i in range(b)
    ]
    fts = encoder(torch.stack(imgs))
    supp_fts = [[fts[shot * b + i] for shot in range(s)] for i in range(b)]
    qry_fts = [[fts[b * s + n * b + i] for n in range(q)] for i in range(b)]
    probs = torch.zeros(b, q, 2, *size, dtype=fts.dtype)
    align = torch.zeros((), dtype=fts.dtype)
    for i in range(b):
        pooled = []
        for shot in range(s):
            up = F.interpolate(supp_fts[i][shot][None], size=size, mode="bilinear")  # align_corners=False
            m = masks[i, shot].to(fts.dtype)
            pooled.append((up[0] * m).sum((1, 2)) / (m.sum() + EPS))
        prototype = sum(pooled) / s
        preds = []
        for n in range(q):
            pred = _pred(_neg_sim(qry_fts[i][n][None], prototype[None]), t)  # (1, h, w)
            preds.append(pred)
            up = F.interpolate(pred[None], size=size, mode="bilinear", align_corners=True)[0, 0]
            probs[i, n, 0] = 1.0 - up
            probs[i, n, 1] = up
        if not train:
            continue
        # Alignment: query prototype from the argmax of [1 - p, p] over all queries of the episode.
        num = torch.zeros_like(prototype)
        den = torch.zeros((), dtype=fts.dtype)
        for n in range(q):
            two = torch.cat([1.0 - preds[n], preds[n]])  # (2, h, w)
            fg = (two.argmax(0) == 1).to(fts.dtype)
            num = num + (qry_fts[i][n] * fg).sum((1, 2))
            den = den + fg.sum()
        if den == 0:
            continue  # skipped episode
        qry_proto = num / (den + EPS)
        loss = torch.zeros((), dtype=fts.dtype)
        for shot in range(s):
            pred = _pred(_neg_sim(supp_fts[i][shot][None], qry_proto[None]), t)
            up = F.interpolate(pred[None], size=size, mode="bilinear", align_corners=True)[0]
            two = torch.cat([1.0 - up, up])[None]  # (1, 2, H, W)
            label = masks[i, shot].long()[None]
            loss = loss + F.nll_loss(_log(two), label) / s
        align = align + loss
    return probs, align / b


def naive_losses(
    probs: Tensor, align: Tensor, t: Tensor, qry_labels: Tensor, t_loss_scaler: float = 1.0
) -> dict[str, Tensor]:
    """The official loss terms: class-weighted NLL of the queries (``main_train.py``), the alignment loss,
    ``t_loss_scaler · t / 20``, and ``total`` their sum."""
    weight = torch.tensor([0.1, 1.0], dtype=probs.dtype)
    flat = torch.cat([probs[:, n] for n in range(probs.shape[1])])  # official order: query-major
    labels = torch.cat([qry_labels[:, n] for n in range(qry_labels.shape[1])]).long()
    query = F.nll_loss(_log(flat), labels, weight=weight, ignore_index=255)
    threshold = t_loss_scaler * t[0] / SCALER
    return {
        "query_nll": query,
        "align_nll": align,
        "threshold": threshold,
        "total": query + align + threshold,
    }


def naive_training_terms(model: nn.Module, supp: Tensor, masks: Tensor, qry: Tensor, labels: Tensor):
    """The official training forward and loss terms with the parameters of a fast ``ADNet`` (its
    ``encoder`` and ``t``): the naive side of ``benchmarks/method_step.py``."""
    probs, align = naive_forward(model.encoder, model.t, supp, masks, qry, True)
    return naive_losses(probs, align, model.t, labels)
