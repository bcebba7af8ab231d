"""SSL-ALPNet (Ouyang et al., Self-supervision with superpixels: training few-shot medical image
segmentation without annotation, ECCV 2020 / IEEE TMI 41, 2022) as a method of the harness: the network of
the official ``FewShotSeg`` (``models/grid_proto_fewshot.py`` and ``models/alpmodule.py`` of
cheng-01037/Self-supervised-Fewshot-Medical-Image-Segmentation), its loss, and its registration.

Steps (the paper's names), for each episode of ``B``:

1. **Feature extraction**: supports and queries in one batch through the DeepLabV3-ResNet101 trunk and a 1×1
   reduction (:class:`models.encoder.DeepLabRes101Encoder`, the official ``TVDeeplabRes101Encoder``):
   ``(B·(S+Q), 3, H, W)`` → ``(B·(S+Q), C, h, w)``, ``C = 256``, ``h = H/8``. The support's foreground and
   background masks are resized to ``h × w`` (bilinear, ``align_corners=False``).
2. **Adaptive local prototypes (ALP)**: average pooling of the support features and masks with a ``k × k``
   window (``k = feature_hw // proto_grid_size`` in training, ``val_wsize`` in evaluation, as the official
   ``isval``); a pooled cell whose mask average exceeds 0.95 gives a local prototype. The foreground adds
   one global prototype per shot (masked average pooling at the feature size); when no ``4 × 4`` window of
   the resized foreground reaches 0.95 (a small support), the foreground uses the global prototype alone,
   averaged over the shots (the official ``'mask'`` mode). The background uses local prototypes only.
3. **Cosine classifier**: ``d_p = 20·cos(F_q, p)`` for every prototype ``p`` (both sides divided by
   ``max(‖·‖, 1e-4)``); the class score is ``Σ_p softmax_p(d)·d_p`` (``'mask'`` mode: ``d`` of the one
   prototype, ``F.cosine_similarity`` with ``eps = 1e-4``). Scores ``[bg, fg]`` are upsampled bilinearly
   (``align_corners=False``) to ``H × W``: ``query_scores (B, Q, 2, H, W)``, softmax →
   ``query_probs``.
4. **Prototype alignment** (training): the argmax of the query scores at the feature size (ties to the
   background) is the mask of a support made of the episode's queries, whose prototypes (the same rules,
   training window) segment each support slice: ``support_scores (B, S, 2, H, W)``.

Loss (the official ``training.py`` and ``alignLoss``): ``query_ce``, cross-entropy of the query scores with
class weights ``[0.05, 1]`` (``use_wce``; ``[1, 1]`` without), ignore index 255; ``align_ce``, unweighted
cross-entropy of each support slice, averaged over shots and episodes. An episode with no background
prototype (no pooled cell > 0.95: the official ``F.conv2d`` fails and its training loop skips the batch)
has ``valid`` False and is left out of both terms; its background score is 0. Device and dtype come from
the inputs; no state is kept on ``self`` per call.
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
from models.losses import IGNORE_INDEX
from models.methods import FewShotOutput, Method, Option, check_episode, check_support, register

#: The cosine classifier's scaler.
SCALER = 20.0
#: A pooled cell is a local prototype when its mask average exceeds this (official FG_THRESH, BG_THRESH).
PROTO_THRESH = 0.95
#: The foreground falls back to its global prototype when no window of this size reaches PROTO_THRESH
#: (the official hard-codes it, independent of the pooling window).
FALLBACK_WINDOW = 4
#: ``safe_norm``'s and ``F.cosine_similarity``'s eps, and the masked average's.
NORM_EPS = 1e-4
POOL_EPS = 1e-5
#: The official weighted cross-entropy (``compose_wt_simple(True, ...)``).
WCE_WEIGHTS = (0.05, 1.0)
LOSS_WEIGHTS = {"query_ce": 1.0, "align_ce": 1.0}
SSL_ALPNET_KEYS = ("encoder.backbone.conv1.weight", "encoder.localconv.weight", "encoder.asppconv.weight")


@dataclass
class SSLALPNetOutput(FewShotOutput):
    """Model output: ``query_probs`` and ``query_scores (B, Q, 2, H, W)`` (the logits the loss reads);
    ``valid (B,)`` (False: an episode without background prototype); in training ``support_scores
    (B, S, 2, H, W)``, the alignment's."""

    query_scores: Tensor | None = None
    valid: Tensor | None = None
    support_scores: Tensor | None = None


@dataclass
class SSLALPNetSupport:
    """A support encoded once: features ``(B, S, C, h, w)``, the masks at that size ``(B, S, h, w)`` and the
    image size."""

    feats: Tensor
    fg: Tensor
    bg: Tensor
    size: tuple[int, int]

    def episode(self, index: int) -> SSLALPNetSupport:
        sl = slice(index, index + 1)
        return SSLALPNetSupport(self.feats[sl], self.fg[sl], self.bg[sl], self.size)


def _unit(x: Tensor, dim: int) -> Tensor:
    """``x / max(‖x‖, 1e-4)`` along ``dim`` (the official ``safe_norm``)."""
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(NORM_EPS)


def _global_prototypes(feats: Tensor, masks: Tensor) -> Tensor:
    """Masked average per shot at the feature size. Shape: ``(B, S, C, h, w)``, ``(B, S, h, w)`` →
    ``(B, S, C)``."""
    return torch.einsum("bschw,bshw->bsc", feats, masks) / (masks.sum((2, 3)).unsqueeze(-1) + POOL_EPS)


def grid_scores(
    qry: Tensor, feats: Tensor, masks: Tensor, window: int, with_global: bool
) -> tuple[Tensor, Tensor]:
    """Steps 2-3 with local prototypes (official ``'gridconv'``; ``'gridconv+'`` with ``with_global``).

    Shape: ``qry (B, Q, C, h, w)``, support ``feats (B, S, C, h, w)``, ``masks (B, S, h, w)`` →
    scores ``(B, Q, h, w)`` and ``(B,)`` whether the episode had any prototype (else its score is 0).
    """
    b, s, c = feats.shape[:3]
    cells = F.avg_pool2d(feats.flatten(0, 1), window).flatten(2).transpose(1, 2)  # (B·S, G, C)
    protos = cells.reshape(b, -1, c)  # (B, S·G, C), shot-major as the official
    keep = F.avg_pool2d(masks.flatten(0, 1).unsqueeze(1), window).reshape(b, -1) > PROTO_THRESH
    if with_global:
        protos = torch.cat([protos, _global_prototypes(feats, masks)], 1)
        keep = torch.cat([keep, keep.new_ones(b, s)], 1)
    dists = SCALER * torch.einsum("bqchw,bpc->bqphw", _unit(qry, 2), _unit(protos, 2))
    mask = keep[:, None, :, None, None]
    # Softmax over the kept prototypes only; dropped ones weigh 0 (no -inf reaches the sum).
    weights = torch.softmax(dists.masked_fill(~mask, float("-inf")), 2).nan_to_num(0.0)
    score = (weights * dists.masked_fill(~mask, 0.0)).sum(2)
    return score, keep.any(1)


def mask_scores(qry: Tensor, feats: Tensor, masks: Tensor) -> Tensor:
    """Step 3 with the global prototype alone, averaged over shots (official ``'mask'``).

    Shape: ``(B, Q, C, h, w)``, ``(B, S, C, h, w)``, ``(B, S, h, w)`` → ``(B, Q, h, w)``."""
    proto = _global_prototypes(feats, masks).mean(1)  # (B, C)
    return SCALER * F.cosine_similarity(qry, proto[:, None, :, None, None], dim=2, eps=NORM_EPS)


def class_scores(qry: Tensor, feats: Tensor, fg: Tensor, bg: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """``[bg, fg]`` scores at the feature size: ``(B, Q, C, h, w)`` and a support → ``(B, Q, 2, h, w)``,
    and ``(B,)`` whether the background had prototypes."""
    bg_score, valid = grid_scores(qry, feats, bg, window, with_global=False)
    # Official test: the foreground has local prototypes if a 4×4 window (over every shot) reaches 0.95.
    fb = fg.shape[:2]
    peak = F.avg_pool2d(fg.flatten(0, 1).unsqueeze(1), FALLBACK_WINDOW).reshape(fb[0], -1).amax(1)
    local = (peak >= PROTO_THRESH)[:, None, None, None]
    fg_local, _ = grid_scores(qry, feats, fg, window, with_global=True)
    fg_score = torch.where(local, fg_local, mask_scores(qry, feats, fg))
    return torch.stack([bg_score, fg_score], 2), valid


class SSLALPNet(nn.Module):
    """The official SSL-ALPNet network (module docstring).

    Args:
        encoder: maps ``(N, 3, H, W)`` to ``(N, C, h, w)`` features (tests inject a small one).
        proto_grid_size, feature_hw: the training pooling window is ``feature_hw // proto_grid_size``
            (official 32 // 8 = 4: a 4 × 4 grid of local prototypes on the 32 × 32 features of 256 px).
        val_wsize: the pooling window in evaluation mode (official 2).
    """

    method = "ssl_alpnet"
    official_extras: dict[str, tuple[float, ...]] = {}

    def __init__(
        self, encoder: nn.Module, proto_grid_size: int = 8, feature_hw: int = 32, val_wsize: int = 2
    ) -> None:
        super().__init__()
        if feature_hw // proto_grid_size < 1:
            raise ValueError(f"proto_grid_size: expected ≤ feature_hw ({feature_hw}), got {proto_grid_size}")
        self.encoder = encoder
        self.train_window = feature_hw // proto_grid_size
        self.val_wsize = val_wsize
        self.unused_parameters = tuple(f"encoder.{n}" for n in getattr(encoder, "unused_parameters", ()))

    @property
    def window(self) -> int:
        return self.train_window if self.training else self.val_wsize

    def forward(
        self, supp_imgs: Tensor, supp_masks: Tensor, qry_imgs: Tensor, align: bool | None = None
    ) -> SSLALPNetOutput:
        """Segment the queries; with alignment (default: in training mode) also re-segment the supports.

        Shape: ``(B, S, 3, H, W)``, ``(B, S, H, W)``, ``(B, Q, 3, H, W)`` → :class:`SSLALPNetOutput`.
        """
        check_episode(supp_imgs, supp_masks, qry_imgs)
        size = tuple(supp_imgs.shape[-2:])
        supp_feats, qry_feats = encode_episode(self.encoder, supp_imgs, qry_imgs)
        fg, bg = self._small_masks(supp_masks.to(supp_feats.dtype), supp_feats.shape[-2:])
        small, valid = class_scores(qry_feats, supp_feats, fg, bg, self.window)
        scores = self._upsample(small, size)
        out = SSLALPNetOutput(torch.softmax(scores, 2), scores, valid)
        if not (self.training if align is None else align):
            return out
        # Alignment: the queries, masked by their argmax at the feature size, as the support.
        q_fg = (small[:, :, 1] > small[:, :, 0]).to(supp_feats.dtype)
        align_small, align_valid = class_scores(supp_feats, qry_feats, q_fg, 1.0 - q_fg, self.train_window)
        out.support_scores = self._upsample(align_small, size)
        out.valid = valid & align_valid
        return out

    @staticmethod
    def _small_masks(masks: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Foreground and background masks at the feature size (each resized, as the official).
        Shape: ``(B, S, H, W)`` → two ``(B, S, h, w)``."""
        both = torch.stack([masks, 1.0 - masks], 2).flatten(0, 1)  # (B·S, 2, H, W)
        small = F.interpolate(both, size=tuple(size), mode="bilinear", align_corners=False)
        small = small.unflatten(0, masks.shape[:2])
        return small[:, :, 0], small[:, :, 1]

    @staticmethod
    def _upsample(scores: Tensor, size: tuple[int, int]) -> Tensor:
        """``(B, K, 2, h, w)`` → ``(B, K, 2, H, W)`` (bilinear, ``align_corners=False``)."""
        up = F.interpolate(scores.flatten(0, 1), size=size, mode="bilinear", align_corners=False)
        return up.unflatten(0, scores.shape[:2])

    def encode_support(self, supp_imgs: Tensor, supp_masks: Tensor) -> SSLALPNetSupport:
        """Features and resized masks of a fixed support (``eval()`` for BatchNorm's running statistics).
        Shape: ``(B, S, 3, H, W)``, ``(B, S, H, W)`` → :class:`SSLALPNetSupport`."""
        check_support(supp_imgs, supp_masks)
        b, s = supp_imgs.shape[:2]
        feats = self.encoder(supp_imgs.flatten(0, 1)).unflatten(0, (b, s))
        fg, bg = self._small_masks(supp_masks.to(feats.dtype), feats.shape[-2:])
        return SSLALPNetSupport(feats, fg, bg, tuple(supp_imgs.shape[-2:]))

    def encode_queries(self, qry_imgs: Tensor) -> tuple[Tensor]:
        """Encoder features of query slices. Shape: ``(N, 3, H, W)`` → ``((N, C, h, w),)``."""
        if qry_imgs.dim() != 4 or qry_imgs.shape[1] != 3 or not qry_imgs.is_floating_point():
            raise ValueError(f"qry_imgs: expected floating point (N, 3, H, W), got {tuple(qry_imgs.shape)}")
        return (self.encoder(qry_imgs),)

    def segment_encoded(self, support: SSLALPNetSupport, query_feats: Tensor) -> Tensor:
        """Steps 2-3 against an encoded support. Shape: ``(B, Q, C, h, w)`` → ``(B, Q, 2, H, W)``."""
        small, _ = class_scores(query_feats, support.feats, support.fg, support.bg, self.window)
        return torch.softmax(self._upsample(small, support.size), 2)


class SSLALPNetLoss(nn.Module):
    """Weighted sum of SSL-ALPNet's two terms (module docstring); episodes with ``valid`` False are left out
    (no valid episode: every term 0, still in the graph). A weight of 0 switches a term off.

    Shape: ``out.query_scores (B, Q, 2, H, W)``, ``qry_labels (B, Q, H, W)`` in {0, 1, 255}, ``supp_masks
    (B, S, H, W)`` → dict of 0-d tensors ``query_ce``, ``align_ce``, ``total``.
    """

    def __init__(self, query_ce: float = 1.0, align_ce: float = 1.0, use_wce: bool = True) -> None:
        super().__init__()
        self.weights = {"query_ce": float(query_ce), "align_ce": float(align_ce)}
        for name, value in self.weights.items():
            if value < 0:
                raise ValueError(f"SSLALPNetLoss: weight {name} must be ≥ 0, got {value}")
        self.register_buffer(
            "class_weights", torch.tensor(WCE_WEIGHTS if use_wce else (1.0, 1.0)), persistent=False
        )

    def forward(self, out: SSLALPNetOutput, qry_labels: Tensor, supp_masks: Tensor) -> dict[str, Tensor]:
        scores = out.query_scores
        b, q, _, h, w = scores.shape
        if qry_labels.shape != (b, q, h, w):
            raise ValueError(f"qry_labels: expected shape {(b, q, h, w)}, got {tuple(qry_labels.shape)}")
        valid = out.valid if out.valid is not None else scores.new_ones(b).bool()
        labels = torch.where(valid[:, None, None, None], qry_labels.long(), IGNORE_INDEX)
        weight = self.class_weights.to(scores.dtype)
        any_valid = bool(valid.any())
        zero = scores.sum() * 0.0
        terms = {
            "query_ce": F.cross_entropy(
                scores.flatten(0, 1), labels.flatten(0, 1), weight=weight, ignore_index=IGNORE_INDEX
            )
            if any_valid
            else zero
        }
        if out.support_scores is None or self.weights["align_ce"] == 0 or not any_valid:
            terms["align_ce"] = zero
        else:
            sp = out.support_scores
            s = sp.shape[1]
            if supp_masks.shape != (b, s, h, w):
                raise ValueError(f"supp_masks: expected shape {(b, s, h, w)}, got {tuple(supp_masks.shape)}")
            pixel = F.cross_entropy(sp.flatten(0, 1), supp_masks.flatten(0, 1).long(), reduction="none")
            per_episode = pixel.mean((1, 2)).view(b, s).mean(1)
            terms["align_ce"] = torch.where(valid, per_episode, 0.0).sum() / valid.sum()
        terms["total"] = sum(self.weights[name] * terms[name] for name in self.weights)
        return terms


def build_ssl_alpnet(
    options: Mapping[str, Any] | None = None,
    pretrained_weights: str | None = None,
    pretrained_path: str | Path | None = None,
    encoder: nn.Module | None = None,
) -> SSLALPNet:
    """Build SSL-ALPNet: the DeepLabV3-ResNet101 encoder (``pretrained_weights``: ``None``,
    ``'deeplabv3'`` — the official ``use_coco_init`` — or ``'resnet101'``) or an injected one."""
    options = dict(options or {})
    if encoder is None:
        encoder = DeepLabRes101Encoder(pretrained_weights=pretrained_weights, pretrained_path=pretrained_path)
    return SSLALPNet(
        encoder,
        proto_grid_size=options.get("proto_grid_size", 8),
        feature_hw=options.get("feature_hw", 32),
        val_wsize=options.get("val_wsize", 2),
    )


def ssl_alpnet_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """SSL-ALPNet has no architecture options (its classifier has no parameters); ``ValueError`` for
    tensors that are not its encoder's. ADNet's state dict is this one plus its threshold ``t``, so the
    exact key comparison of :func:`models.weights.identify_methods` tells them apart."""
    missing = [key for key in SSL_ALPNET_KEYS if key not in state]
    if missing:
        raise ValueError(f"not an SSL-ALPNet state dict: it lacks {missing}")
    channels = tuple(state["encoder.localconv.weight"].shape[:2])
    if channels != (DEEPLAB_FEATURE_CHANNELS, 2048):
        raise ValueError(
            f"encoder.localconv.weight maps {channels[1]} to {channels[0]} channels; SSL-ALPNet's map 2048 "
            f"to {DEEPLAB_FEATURE_CHANNELS}"
        )
    return {}


SSL_ALPNET_METHOD = register(
    Method(
        name="ssl_alpnet",
        title="SSL-ALPNet",
        paper="Ouyang et al., Self-supervised learning for few-shot medical image segmentation, IEEE TMI 41, "
        "2022 (ECCV 2020)",
        build=lambda options, weights, path: build_ssl_alpnet(options, weights, path),
        loss=lambda weights, options: SSLALPNetLoss(**weights, use_wce=options.get("use_wce", True)),
        loss_weights=LOSS_WEIGHTS,
        options={
            "proto_grid_size": Option.integer(
                8, 1, "ALP grid: the training pooling window is feature_hw // proto_grid_size"
            ),
            "feature_hw": Option.integer(32, 1, "the feature size the official window is computed from"),
            "val_wsize": Option.integer(2, 1, "ALP pooling window at test time", used_by=("test",)),
            "use_wce": Option.flag(True, "class weights [0.05, 1] in the query loss", used_by=("train",)),
        },
        # What config_ssl_upload.py and training.py do: seed 1234, SGD lr 1e-3 momentum 0.9 weight decay 5e-4,
        # lr ×0.95 every 1000 steps, the MS-COCO DeepLabV3 initialisation (use_coco_init), a snapshot every
        # 25000 steps. Its n_steps = 100100 runs 100100 // 1000 = 100 reloads of 1000 steps (CHAOST2), with
        # milestones 1000 … 99000: exactly what n_steps = 100000 gives here.
        official_script={
            "seed": 1234,
            "n_steps": 100000,
            "max_iters_per_load": 1000,
            "lr_step_gamma": 0.95,
            "optim": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4},
            "pretrained_weights": "deeplabv3",
            "save_snapshot_every": 25000,
            "validate_every": 2000,
        },
        architecture_of=ssl_alpnet_architecture,
        pseudo_labels="superpixels_2d",
    )
)
