"""Q-Net (Shen et al., Q-Net: Query-Informed Few-Shot Medical Image Segmentation, IEEE Intelligent Systems
2023): ADNet's anomaly-score thresholding with the threshold read off the query, on two feature levels, and a
test-time refinement of the prototypes on the query. Its loss (:class:`QNetLoss`) and registration
(``method=qnet``) are here too; the official code is ``models/fewshot.py`` of shenqq377/Q-Net.

Steps (official names in brackets):

1. **Encoding** (``encoder``): supports and queries in one ResNet-101 batch (BatchNorm statistics in
   training) → layer-3 features ``reduce1(layer3)`` ``(N, C, H/4, W/4)``, layer-4 features ``reduce2(layer4)``
   ``(N, C, H/8, W/8)`` and a threshold ``t = reduce1d(fc(avgpool(layer4)))`` ``(N,)`` per image.
2. **Prototypes** (``getFeatures``, ``getPrototype``): per level, the masked average of the bilinearly
   upsampled support features (``align_corners=False``, as the official ``F.interpolate`` default), averaged
   over the shots → ``(B, C)``.
3. **Query-informed threshold** (``getPred``): the anomaly score ``s = -20·cos(F_q, p)`` against the query's
   own threshold ``t_q``: ``p_fg = 1 - σ(0.5·(s - t_q))`` → ``(B·Q, h, w)`` per level.
4. **Dual-scale combination**: both maps upsampled to ``H × W`` (``align_corners=True``) and averaged with
   weights ``(α, 1 - α)`` (official α = 0.9) → ``[1 - p, p]`` ``(B, Q, 2, H, W)``.
5. **Prototype refinement** (``updatePrototype``, eval mode only, ``refine_iters > 0``): per query and level,
   the prototype is a free variable optimised by Adam (``refine_lr``) for ``refine_iters`` steps; each step
   replaces the features under the current predicted mask by the prototype and minimises
   ``BCE(σ(minmax(F_q)), σ(minmax(F_q')))``, then re-predicts with the updated prototype.
6. **Prototype alignment** (``alignLoss``, training mode): query 0's predicted mask gives query prototypes
   (step 2 on the query), which segment every support slice (steps 3-4, the query's threshold); episodes with
   an empty predicted mask are skipped.

The official code thresholds every episode's maps with the thresholds of all queries of the batch (a
broadcast that runs only for batch size 1, the official one): here episode ``i`` uses its own query's.
Parameter names are the official ones (``encoder.*``; the official model has no other tensor), so official
``FewShotSeg`` state dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.encoder import Res101Encoder
from models.losses import CLASS_WEIGHTS, IGNORE_INDEX, clamped_log
from models.methods import FewShotOutput, Method, Option, check_episode, check_support, register
from models.prototypes import cosine_map, masked_average, upsample

#: The official ``scaler`` of the anomaly score, the dual-scale weight α and the refinement defaults.
SCALER = 20.0
ALPHA = 0.9
REFINE_ITERS = 7
REFINE_LR = 0.01
#: Keys every Q-Net state dict holds: the encoder and nothing else.
QNET_KEYS = (
    "encoder.backbone.conv1.weight",
    "encoder.backbone.layer4.0.conv1.weight",
    "encoder.reduce1.weight",
    "encoder.reduce2.weight",
    "encoder.reduce1d.weight",
)
LOSS_WEIGHTS = {"query_nll": 1.0, "align_nll": 1.0}


@dataclass
class QNetOutput(FewShotOutput):
    """``query_probs (B, Q, 2, H, W)``; in training mode also ``support_probs (B, S, 2, H, W)``, the
    alignment predictions of the support slices, and ``align_valid (B,)``, False where query 0's predicted
    mask is empty (the official code skips those episodes)."""

    support_probs: Tensor | None = None
    align_valid: Tensor | None = None


@dataclass
class QNetSupport:
    """A support encoded once: one prototype per level, ``(B, C)`` each, and the image size ``(H, W)``."""

    prototypes: tuple[Tensor, ...]
    size: tuple[int, int]

    def episode(self, index: int) -> QNetSupport:
        return QNetSupport(tuple(p[index : index + 1] for p in self.prototypes), self.size)


def foreground_map(feats: Tensor, prototypes: Tensor, t: Tensor) -> Tensor:
    """Step 3: ``1 - σ(0.5·(-20·cos(F, p) - t))``.

    Shape: ``(N, C, h, w)``, ``(N, C)``, ``(N,)`` → ``(N, h, w)``."""
    score = -cosine_map(feats, prototypes[:, None])[:, 0] * SCALER
    return 1.0 - torch.sigmoid(0.5 * (score - t[:, None, None]))


def _minmax(x: Tensor) -> Tensor:
    """Each sample rescaled to [0, 1] by its own minimum and maximum over ``(C, h, w)``."""
    low = x.amin((1, 2, 3), keepdim=True)
    return (x - low) / (x.amax((1, 2, 3), keepdim=True) - low)


def refine_prototypes(
    feats: Sequence[Tensor], prototypes: Sequence[Tensor], t: Tensor, iters: int, lr: float
) -> list[Tensor]:
    """Step 5 for every query and level at once. The per-(query, level) losses are summed: each prototype
    receives the gradient of its own loss only, and Adam is elementwise, so one optimiser over all is the
    official one optimiser per query and level.

    Shape: per level ``feats (N, C, h, w)`` and ``prototypes (N, C)``, ``t (N,)`` → per level ``(N, C)``.
    """
    # The harness evaluates under inference mode; the refinement needs autograd on copies of the inputs.
    with torch.inference_mode(False), torch.enable_grad():
        feats = [f.detach().clone() for f in feats]
        t = t.detach().clone()
        params = [p.detach().clone().requires_grad_(True) for p in prototypes]
        optimiser = torch.optim.Adam(params, lr=lr)
        targets = [torch.sigmoid(_minmax(f)) for f in feats]
        with torch.no_grad():
            fg = [foreground_map(f, p, t) for f, p in zip(feats, params, strict=True)]
        for _ in range(iters):
            loss = 0
            for f, p, x, m in zip(feats, params, targets, fg, strict=True):
                mask = (m > 1.0 - m).to(f.dtype)[:, None]  # argmax of [1 - p, p], ties → background
                replaced = f * (1 - mask) + p[:, :, None, None] * mask
                y = torch.sigmoid(_minmax(replaced))
                loss = loss + F.binary_cross_entropy(x, y, reduction="none").mean((1, 2, 3)).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                fg = [foreground_map(f, p, t) for f, p in zip(feats, params, strict=True)]
    return [p.detach() for p in params]


class QNet(nn.Module):
    """Q-Net few-shot segmenter (module docstring).

    Args:
        encoder: maps ``(N, 3, H, W)`` to ``((N, C, h, w), (N, C, h', w'), (N,))``: layer-3 and layer-4
            features and thresholds (``Res101Encoder(layer4_features=True)``; tests inject a small one).
        alpha: weight of the layer-3 map in step 4 (layer 4: ``1 - alpha``).
        refine_iters, refine_lr: step 5 (eval mode only; 0 iterations switch it off).
    """

    method = "qnet"
    unused_parameters = ()
    #: The official loss modules are unweighted ``NLLLoss``: no buffer in official checkpoints.
    official_extras: dict[str, tuple[float, ...]] = {}

    def __init__(
        self,
        encoder: nn.Module,
        alpha: float = ALPHA,
        refine_iters: int = REFINE_ITERS,
        refine_lr: float = REFINE_LR,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.alpha = alpha
        self.refine_iters = refine_iters
        self.refine_lr = refine_lr

    def forward(self, supp_imgs: Tensor, supp_masks: Tensor, qry_imgs: Tensor) -> QNetOutput:
        """Steps 1-5 for the queries; in training mode step 6 for the supports.

        Shape: ``(B, S, 3, H, W)``, ``(B, S, H, W)``, ``(B, Q, 3, H, W)`` → :class:`QNetOutput`.
        """
        check_episode(supp_imgs, supp_masks, qry_imgs)
        b, s = supp_imgs.shape[:2]
        q = qry_imgs.shape[1]
        *levels, t = self.encoder(torch.cat([supp_imgs.flatten(0, 1), qry_imgs.flatten(0, 1)]))
        supp_feats = [f[: b * s].unflatten(0, (b, s)) for f in levels]
        qry_feats = [f[b * s :].unflatten(0, (b, q)) for f in levels]
        t_qry = t[b * s :].view(b, q)
        masks = supp_masks.to(t.dtype)
        support = self.prepare_support(supp_feats, masks)
        query_probs = self.segment_encoded(support, *qry_feats, t_qry)
        if not self.training:
            return QNetOutput(query_probs)

        # Step 6: query 0 with its predicted mask is the support, each support slice a query; the threshold
        # stays query 0's.
        pred_mask = (query_probs[:, 0, 1] > query_probs[:, 0, 0]).to(t.dtype)  # argmax, ties → bg
        qry_protos = [masked_average(f[:, 0], pred_mask, align_corners=False) for f in qry_feats]
        t_align = t_qry[:, 0].repeat_interleave(s)
        maps = [
            foreground_map(f.flatten(0, 1), p.repeat_interleave(s, 0), t_align)
            for f, p in zip(supp_feats, qry_protos, strict=True)
        ]
        support_probs = self._combine(maps, support.size).unflatten(0, (b, s))
        return QNetOutput(query_probs, support_probs, pred_mask.flatten(1).any(1))

    def prepare_support(self, supp_feats: Sequence[Tensor], supp_masks: Tensor) -> QNetSupport:
        """Step 2. Shape: per level ``(B, S, C, h, w)``, ``(B, S, H, W)`` → :class:`QNetSupport`."""
        b, s = supp_masks.shape[:2]
        flat_masks = supp_masks.flatten(0, 1)
        prototypes = tuple(
            masked_average(f.flatten(0, 1), flat_masks, align_corners=False).view(b, s, -1).mean(1)
            for f in supp_feats
        )
        return QNetSupport(prototypes, tuple(supp_masks.shape[-2:]))

    def encode_support(self, supp_imgs: Tensor, supp_masks: Tensor) -> QNetSupport:
        """Steps 1-2 for a fixed support, encoded on its own (BatchNorm must use running statistics).
        Shape: ``(B, S, 3, H, W)``, ``(B, S, H, W)`` → :class:`QNetSupport`."""
        check_support(supp_imgs, supp_masks)
        b, s = supp_imgs.shape[:2]
        *levels, t = self.encoder(supp_imgs.flatten(0, 1))
        return self.prepare_support([f.unflatten(0, (b, s)) for f in levels], supp_masks.to(t.dtype))

    def encode_queries(self, qry_imgs: Tensor) -> tuple[Tensor, ...]:
        """Step 1 for query slices. Shape: ``(N, 3, H, W)`` → ``(N, C, h, w)``, ``(N, C, h', w')``,
        ``(N,)``."""
        if qry_imgs.dim() != 4 or qry_imgs.shape[1] != 3 or not qry_imgs.is_floating_point():
            raise ValueError(f"qry_imgs: expected floating point (N, 3, H, W), got {tuple(qry_imgs.shape)}")
        return tuple(self.encoder(qry_imgs))

    def segment_encoded(self, support: QNetSupport, *queries: Tensor) -> Tensor:
        """Steps 3-5 against an encoded support. Shape: per level ``(B, Q, C, h, w)``, then ``t (B, Q)`` →
        ``(B, Q, 2, H, W)``."""
        *levels, t_qry = queries
        b, q = t_qry.shape
        feats = [f.flatten(0, 1) for f in levels]
        t = t_qry.flatten()
        prototypes = [p.repeat_interleave(q, 0) for p in support.prototypes]
        if not self.training and self.refine_iters > 0:
            prototypes = refine_prototypes(feats, prototypes, t, self.refine_iters, self.refine_lr)
        maps = [foreground_map(f, p, t) for f, p in zip(feats, prototypes, strict=True)]
        return self._combine(maps, support.size).unflatten(0, (b, q))

    def _combine(self, maps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """Step 4. Shape: per level ``(N, h, w)`` → ``(N, 2, H, W)``."""
        layer3, layer4 = (upsample(m[:, None], size, align_corners=True) for m in maps)
        fg = self.alpha * layer3 + (1.0 - self.alpha) * layer4
        return torch.cat([1.0 - fg, fg], 1)


class QNetLoss(nn.Module):
    """The official training loss: the weighted NLL of the queries (class weights ``[0.1, 1.0]``, ignore
    index 255, one mean over all pixels of all episodes) plus the alignment NLL (unweighted, the official
    ``criterion``): per episode the mean over shots of each support slice's pixel mean, summed over the
    episodes with a non-empty predicted query mask and divided by B.

    Shape: ``out.query_probs (B, Q, 2, H, W)``, ``qry_labels (B, Q, H, W)``, ``supp_masks (B, S, H, W)`` →
    0-d ``query_nll``, ``align_nll``, ``total``.
    """

    def __init__(self, query_nll: float = 1.0, align_nll: float = 1.0) -> None:
        super().__init__()
        self.weights = {"query_nll": float(query_nll), "align_nll": float(align_nll)}

    def forward(self, out: QNetOutput, qry_labels: Tensor, supp_masks: Tensor) -> dict[str, Tensor]:
        probs = out.query_probs.flatten(0, 1)
        weight = probs.new_tensor(CLASS_WEIGHTS)
        query = F.nll_loss(
            clamped_log(probs), qry_labels.flatten(0, 1).long(), weight=weight, ignore_index=IGNORE_INDEX
        )
        if out.support_probs is None:
            align = query.new_zeros(())
        else:
            b, s = out.support_probs.shape[:2]
            per_pixel = F.nll_loss(
                clamped_log(out.support_probs.flatten(0, 1)),
                supp_masks.flatten(0, 1).long(),
                reduction="none",
            )
            per_episode = per_pixel.mean((1, 2)).view(b, s).mean(1)
            align = (per_episode * out.align_valid.to(per_episode.dtype)).sum() / b
        terms = {"query_nll": query, "align_nll": align}
        terms["total"] = sum(self.weights[k] * v for k, v in terms.items())
        return terms


def build_qnet(
    pretrained_weights: str | None = None,
    pretrained_path: str | Path | None = None,
    alpha: float = ALPHA,
    refine_iters: int = REFINE_ITERS,
    refine_lr: float = REFINE_LR,
    encoder: nn.Module | None = None,
) -> QNet:
    """Build Q-Net; ``encoder`` (tests) replaces the ResNet-101 encoder with layer-4 features."""
    if encoder is None:
        encoder = Res101Encoder(pretrained_weights, pretrained_path, layer4_features=True)
    return QNet(encoder, alpha=alpha, refine_iters=refine_iters, refine_lr=refine_lr)


def qnet_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Q-Net has no architecture option; ``ValueError`` for a state dict without its encoder keys (the exact
    key set — no decoder, no fusion layer — is checked by the harness against the built network)."""
    missing = [key for key in QNET_KEYS if key not in state]
    if missing:
        raise ValueError(f"not a Q-Net state dict: it lacks {missing}")
    return {}


def _build(options: Mapping[str, Any], pretrained_weights: str | None, pretrained_path: str | None) -> QNet:
    return build_qnet(
        pretrained_weights,
        pretrained_path,
        alpha=options["alpha"],
        refine_iters=options["refine_iters"],
        refine_lr=options["refine_lr"],
    )


QNET_METHOD = register(
    Method(
        name="qnet",
        title="Q-Net",
        paper="Shen et al., Q-Net: Query-Informed Few-Shot Medical Image Segmentation, IEEE Intelligent "
        "Systems 38(4), 2023",
        build=_build,
        loss=lambda weights, options: QNetLoss(**weights),
        loss_weights=LOSS_WEIGHTS,
        options={
            "alpha": Option.number(ALPHA, 0.0, "weight of the layer-3 map (layer 4: 1 - alpha)", maximum=1.0),
            "refine_iters": Option.integer(
                REFINE_ITERS, 0, "test-time prototype refinement: Adam steps per query (0: off)"
            ),
            "refine_lr": Option.number(REFINE_LR, 0.0, "test-time prototype refinement: Adam learning rate"),
        },
        # What the official scripts/train_abd_mr.sh and val.sh pass on top of the official config defaults,
        # plus our validation cadence (as DIFD's).
        official_script={
            "seed": 2021,
            "lr_step_gamma": 0.98,
            "n_steps": 30000,
            "max_iters_per_load": 1000,
            "save_snapshot_every": 10000,
            "supp_idx": 2,
            "validate_every": 2000,
        },
        architecture_of=qnet_architecture,
        describe_state=lambda state: "a Q-Net state dict in the official layout (encoder only)",
    )
)
