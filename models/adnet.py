"""ADNet (Hansen et al., Anomaly detection-inspired few-shot medical image segmentation through
self-supervision with supervoxels, Medical Image Analysis 78, 2022) as a method of the harness: the network
of the official ``FewShotSeg`` (``models/fewshot_anom.py`` of sha168/ADNet), its loss, and its registration.

Steps (the paper's names), for each episode of ``B``:

1. **Feature extraction**: supports and queries in one batch through the DeepLabV3-ResNet101 trunk and a 1×1
   reduction (:class:`models.encoder.DeepLabRes101Encoder`): ``(B·(S+Q), 3, H, W)`` → ``(B·(S+Q), C, h, w)``
   with ``C = 256``, ``h = H/8``.
2. **Foreground prototype**: masked average pooling of the support features upsampled to the mask size
   (bilinear, ``align_corners=False`` as the official ``getFeatures``), averaged over the shots: ``p (B, C)``.
   No background prototype: the background is what is anomalous with respect to ``p``.
3. **Anomaly scores**: ``S = -α·cos(F_q, p)`` per query pixel at the feature size, ``α = 20``.
4. **Learned threshold**: a single learned scalar ``T`` (the parameter ``t``, initialised at -10; it is not
   computed from the query), foreground probability ``1 - σ(½(S - T))``, upsampled bilinearly
   (``align_corners=True``) to ``H × W``: ``query_probs (B, Q, 2, H, W)`` = ``[1 - p_fg, p_fg]``.
5. **Prototype alignment** (training): the queries' predicted foreground at the feature size (argmax, ties to
   the background) gives a query prototype (masked average over all queries of the episode, without
   upsampling), which segments each support slice in the same way: ``support_probs (B, S, 2, H, W)``;
   episodes whose predicted foreground is empty are skipped (``align_valid``).

Loss (the official ``main_train.py`` and ``alignLoss``): ``query_nll`` (NLL with class weights [0.1, 1],
ignore index 255, over all query pixels), ``align_nll`` (unweighted NLL of each support slice, averaged over
shots, summed over the valid episodes and divided by ``B``), ``threshold`` (``T/α``; its weight is the
official ``t_loss_scaler``, 1). Device and dtype come from the inputs; no state is kept on ``self`` per call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.encoder import DEEPLAB_FEATURE_CHANNELS, DeepLabRes101Encoder, encode_episode
from models.losses import CLASS_WEIGHTS, IGNORE_INDEX, clamped_log
from models.methods import FewShotOutput, Method, check_episode, check_support, register
from models.prototypes import MAP_EPS, cosine_map, masked_average, upsample

#: ``α`` of the anomaly score ``S = -α·cos`` (the official ``scaler``).
SCALER = 20.0
#: Initial value of the learned threshold ``T``.
T_INIT = -10.0
#: The three terms and their default weights (config key ``loss_weights``; ``threshold`` is the official
#: ``t_loss_scaler``).
LOSS_WEIGHTS = {"query_nll": 1.0, "align_nll": 1.0, "threshold": 1.0}
#: Keys every ADNet state dict holds (the official module tree).
ADNET_KEYS = ("t", "encoder.backbone.conv1.weight", "encoder.localconv.weight", "encoder.asppconv.weight")


@dataclass
class ADNetOutput(FewShotOutput):
    """Model output: ``query_probs (B, Q, 2, H, W)``; in training also ``support_probs (B, S, 2, H, W)`` (the
    alignment predictions, computed for every episode), ``align_valid (B,)`` (False where the predicted
    query foreground is empty: the official code skips those episodes) and ``t (1,)`` (the threshold, for
    the threshold loss)."""

    support_probs: Tensor | None = None
    align_valid: Tensor | None = None
    t: Tensor | None = None


@dataclass
class ADNetSupport:
    """A support encoded once (:meth:`ADNet.encode_support`): ``prototype (B, C)`` and the image size."""

    prototype: Tensor
    size: tuple[int, int]

    def episode(self, index: int) -> ADNetSupport:
        return ADNetSupport(self.prototype[index : index + 1], self.size)


class ADNet(nn.Module):
    """The official ADNet network (module docstring).

    Args:
        encoder: maps ``(N, 3, H, W)`` to ``(N, C, h, w)`` features (tests inject a small one); its
            ``unused_parameters`` (names), when it has them, are the model's, prefixed ``encoder.``.
    """

    method = "adnet"
    #: The official model's loss module is an unweighted ``NLLLoss``: no buffer in its checkpoints.
    official_extras: dict[str, tuple[float, ...]] = {}

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.t = nn.Parameter(torch.tensor([T_INIT]))
        self.unused_parameters = tuple(f"encoder.{n}" for n in getattr(encoder, "unused_parameters", ()))

    def forward(
        self, supp_imgs: Tensor, supp_masks: Tensor, qry_imgs: Tensor, align: bool | None = None
    ) -> ADNetOutput:
        """Segment the queries; with alignment (default: in training mode) also re-segment the supports.

        Shape: ``(B, S, 3, H, W)``, ``(B, S, H, W)``, ``(B, Q, 3, H, W)`` → :class:`ADNetOutput`.
        """
        check_episode(supp_imgs, supp_masks, qry_imgs)
        size = tuple(supp_imgs.shape[-2:])
        supp_feats, qry_feats = encode_episode(self.encoder, supp_imgs, qry_imgs)
        masks = supp_masks.to(supp_feats.dtype)
        prototype = self.prototype(supp_feats, masks)
        fg = self.foreground(qry_feats, prototype)  # (B, Q, h, w)
        query_probs = self.probabilities(fg, size)
        if not (self.training if align is None else align):
            return ADNetOutput(query_probs)

        # Prototype alignment: argmax of [1 - p, p] at the feature size (ties to the background); the query
        # prototype pools the features themselves, over every query of the episode.
        pred = (fg > 1 - fg).to(supp_feats.dtype)  # (B, Q, h, w)
        area = pred.sum((1, 2, 3))
        qry_proto = torch.einsum("bqchw,bqhw->bc", qry_feats, pred) / (area.unsqueeze(1) + MAP_EPS)
        support_probs = self.probabilities(self.foreground(supp_feats, qry_proto), size)
        return ADNetOutput(query_probs, support_probs, area > 0, self.t)

    @staticmethod
    def prototype(support_feats: Tensor, support_masks: Tensor) -> Tensor:
        """Step 2: the foreground prototype, masked average pooling of the upsampled features (torch's
        default ``align_corners=False``, as the official ``getFeatures``) averaged over shots.

        Shape: ``(B, S, C, h, w)``, ``(B, S, H, W)`` → ``(B, C)``.
        """
        pooled = masked_average(support_feats.flatten(0, 1), support_masks.flatten(0, 1), align_corners=False)
        return pooled.unflatten(0, support_feats.shape[:2]).mean(1)

    def foreground(self, feats: Tensor, prototype: Tensor) -> Tensor:
        """Steps 3-4 at the feature size: anomaly scores ``S = -α·cos(F, p)`` against the episode's
        prototype, foreground probability ``1 - σ(½(S - T))``.

        Shape: ``feats (B, K, C, h, w)``, ``prototype (B, C)`` → ``(B, K, h, w)``.
        """
        b, k = feats.shape[:2]
        cos = cosine_map(feats.flatten(0, 1), prototype.repeat_interleave(k, 0).unsqueeze(1))
        score = -SCALER * cos[:, 0]
        return (1.0 - torch.sigmoid(0.5 * (score - self.t))).unflatten(0, (b, k))

    @staticmethod
    def probabilities(fg: Tensor, size: tuple[int, int]) -> Tensor:
        """Foreground probabilities at the feature size → ``[bg, fg]`` at the image size (bilinear,
        ``align_corners=True``). Shape: ``(B, K, h, w)`` → ``(B, K, 2, H, W)``."""
        up = upsample(fg.flatten(0, 1).unsqueeze(1), size, align_corners=True)
        return torch.cat([1.0 - up, up], 1).unflatten(0, fg.shape[:2])

    def encode_support(self, supp_imgs: Tensor, supp_masks: Tensor) -> ADNetSupport:
        """The prototype of a fixed support, computed once (BatchNorm must use its running statistics:
        ``eval()``). Shape: ``(B, S, 3, H, W)``, ``(B, S, H, W)`` in {0, 1} → :class:`ADNetSupport`."""
        check_support(supp_imgs, supp_masks)
        b, s = supp_imgs.shape[:2]
        feats = self.encoder(supp_imgs.flatten(0, 1)).unflatten(0, (b, s))
        return ADNetSupport(self.prototype(feats, supp_masks.to(feats.dtype)), tuple(supp_imgs.shape[-2:]))

    def encode_queries(self, qry_imgs: Tensor) -> tuple[Tensor]:
        """Encoder features of query slices. Shape: ``(N, 3, H, W)`` → ``((N, C, h, w),)``."""
        if qry_imgs.dim() != 4 or qry_imgs.shape[1] != 3 or not qry_imgs.is_floating_point():
            raise ValueError(f"qry_imgs: expected floating point (N, 3, H, W), got {tuple(qry_imgs.shape)}")
        return (self.encoder(qry_imgs),)

    def segment_encoded(self, support: ADNetSupport, query_feats: Tensor) -> Tensor:
        """Steps 3-4 against an encoded support. Shape: ``(B, Q, C, h, w)`` → ``(B, Q, 2, H, W)``."""
        return self.probabilities(self.foreground(query_feats, support.prototype), support.size)


class ADNetLoss(nn.Module):
    """Weighted sum of ADNet's three loss terms (module docstring); a weight of 0 switches a term off (the
    alignment term is then not computed and reported as 0).

    Shape: ``out.query_probs (B, Q, 2, H, W)``, ``qry_labels (B, Q, H, W)`` int64 in {0, 1, 255},
    ``supp_masks (B, S, H, W)`` → dict of 0-d tensors ``query_nll``, ``align_nll``, ``threshold``, ``total``.
    """

    def __init__(self, query_nll: float = 1.0, align_nll: float = 1.0, threshold: float = 1.0) -> None:
        super().__init__()
        self.weights = {
            "query_nll": float(query_nll),
            "align_nll": float(align_nll),
            "threshold": float(threshold),
        }
        for name, value in self.weights.items():
            if value < 0:
                raise ValueError(f"ADNetLoss: weight {name} must be ≥ 0, got {value}")
        self.register_buffer("class_weights", torch.tensor(CLASS_WEIGHTS), persistent=False)

    def forward(self, out: ADNetOutput, qry_labels: Tensor, supp_masks: Tensor) -> dict[str, Tensor]:
        probs = out.query_probs
        b, q, k, h, w = probs.shape
        if qry_labels.shape != (b, q, h, w):
            raise ValueError(f"qry_labels: expected shape {(b, q, h, w)}, got {tuple(qry_labels.shape)}")
        weight = self.class_weights.to(probs.dtype)
        terms = {
            "query_nll": F.nll_loss(
                clamped_log(probs.flatten(0, 1)),
                qry_labels.flatten(0, 1).long(),
                weight=weight,
                ignore_index=IGNORE_INDEX,
            )
        }
        zero = probs.new_zeros(())
        if out.support_probs is None or self.weights["align_nll"] == 0:
            terms["align_nll"] = zero
        else:
            sp = out.support_probs
            s = sp.shape[1]
            if supp_masks.shape != (b, s, h, w):
                raise ValueError(f"supp_masks: expected shape {(b, s, h, w)}, got {tuple(supp_masks.shape)}")
            # Support labels: 1 where the mask is 1, 0 where it is 0, 255 elsewhere (official construction);
            # one unweighted NLLLoss (a mean over the slice's pixels) per support slice.
            labels = torch.where(supp_masks == 1, 1, torch.where(supp_masks == 0, 0, IGNORE_INDEX)).long()
            labels = labels.flatten(0, 1)
            pixel = F.nll_loss(
                clamped_log(sp.flatten(0, 1)), labels, ignore_index=IGNORE_INDEX, reduction="none"
            )
            known = (labels != IGNORE_INDEX).sum((1, 2)).to(pixel.dtype)
            per_slice = (pixel.sum((1, 2)) / known).view(b, s)
            valid = (
                out.align_valid if out.align_valid is not None else torch.ones_like(per_slice[:, 0]).bool()
            )
            # Skipped episodes contribute zero; torch.where keeps their values out of the gradient.
            terms["align_nll"] = torch.where(valid, per_slice.mean(1), 0.0).sum() / b
        terms["threshold"] = out.t.sum() / SCALER if out.t is not None else zero
        terms["total"] = sum(self.weights[name] * terms[name] for name in self.weights)
        return terms


def build_adnet(
    pretrained_weights: str | None = None,
    pretrained_path: str | Path | None = None,
    encoder: nn.Module | None = None,
) -> ADNet:
    """Build ADNet: the DeepLabV3-ResNet101 encoder (``pretrained_weights``: ``None``, ``'resnet101'`` — what
    the official training gets — or ``'deeplabv3'``, the official ``use_coco_init``) or an injected one."""
    if encoder is None:
        encoder = DeepLabRes101Encoder(pretrained_weights=pretrained_weights, pretrained_path=pretrained_path)
    return ADNet(encoder)


def adnet_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """ADNet has no architecture options; ``ValueError`` for tensors that are not ADNet's."""
    missing = [key for key in ADNET_KEYS if key not in state]
    if missing:
        raise ValueError(f"not an ADNet state dict: it lacks {missing}")
    channels = tuple(state["encoder.localconv.weight"].shape[:2])
    if channels != (DEEPLAB_FEATURE_CHANNELS, 2048) or tuple(state["t"].shape) != (1,):
        raise ValueError(
            f"encoder.localconv.weight maps {channels[1]} to {channels[0]} channels and t has shape "
            f"{tuple(state['t'].shape)}; ADNet's map 2048 to {DEEPLAB_FEATURE_CHANNELS}, with a (1,) t"
        )
    return {}


ADNET_METHOD = register(
    Method(
        name="adnet",
        title="ADNet",
        paper="Hansen et al., Anomaly detection-inspired few-shot medical image segmentation through "
        "self-supervision with supervoxels, Medical Image Analysis 78, 2022",
        build=lambda options, weights, path: build_adnet(weights, path),
        loss=lambda weights, options: ADNetLoss(**weights),
        loss_weights=LOSS_WEIGHTS,
        # What the official scripts/train_abd_2D.sh and main_train.py's defaults set: seed 2021, 50k steps,
        # lr 1e-3 decayed by 0.95 every 1000 steps, SGD momentum 0.9 and weight decay 5e-4, and the ImageNet
        # ResNet-101 trunk (``FewShotSeg(False)`` under torchvision 0.10 still loads it); plus our
        # validation cadence. The official support rule (the fold's last volume) is not applied: every
        # method is evaluated under the shared protocol (method.md §5).
        official_script={
            "seed": 2021,
            "n_steps": 50000,
            "max_iters_per_load": 1000,
            "lr_step_gamma": 0.95,
            "optim": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4},
            "pretrained_weights": "resnet101",
            "save_snapshot_every": 10000,
            "validate_every": 2000,
        },
        architecture_of=adnet_architecture,
    )
)
