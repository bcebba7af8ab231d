"""DIFD top model (method.md §4): encoder → Dual Interspersion → Interactive Fusion Refinement → Flexible
Deployment → fg/bg decoders, plus the prototype-alignment pass used by the training loss (method.md §4.7).

The parts are built elsewhere (``models/builder.py``) and injected, so tests can pass a tiny encoder.
Parameter names follow the official module tree: ``encoder.*``, ``fuse.weight``, ``decoder1.*`` (foreground
branch) and ``decoder2.*`` (background branch).

Shape: ``supp_imgs (B, S, 3, H, W)``, ``supp_masks (B, S, H, W)`` in {0, 1}, ``qry_imgs (B, Q, 3, H, W)`` →
``DIFDOutput`` with ``query_probs (B, Q, 2, H, W)`` ([bg, fg] probabilities), and, when alignment runs,
``support_probs (B, S, 2, H, W)`` and ``align_valid (B,)``.

Inference with a fixed support (``segment.py``): :meth:`DIFD.encode_support` computes everything the head
derives from the support alone (encoder features and threshold, DI's basis sets, the global prototypes)
once, as an :class:`EncodedSupport`; :meth:`DIFD.encode_queries` encodes query slices, and
:meth:`DIFD.segment_encoded` runs the per-query part of the head (IFR, FD, decoders) for any number of
query batches against it. ``forward`` runs the same code, so both paths give the same probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.decoder import Decoder
from models.dual_interspersion import DualInterspersion, InterspersionPlan, PrototypeSets
from models.flexible_deployment import FlexibleDeployment
from models.fusion_refinement import InteractiveFusionRefinement
from models.losses import CLASS_WEIGHTS
from models.methods import FewShotOutput, check_episode, check_support
from models.prototypes import MAP_EPS, masked_sum

MULTI_SHOT = ("official", "all")


@dataclass
class DIFDOutput(FewShotOutput):
    """Model output.

    ``query_probs (B, Q, 2, H, W)``: [bg, fg] probabilities of the queries.
    ``support_probs (B, S, 2, H, W)`` or None: prototype-alignment predictions of the support slices (computed
    for every episode, without a host synchronisation to find the skipped ones).
    ``align_valid (B,)`` bool or None: False where the predicted query mask is empty (query 0's; with
    ``multi_shot='all'`` the union over queries); the official code skips those episodes, and ``DIFDLoss``
    gives them zero alignment loss.
    """

    support_probs: Tensor | None = None
    align_valid: Tensor | None = None


@dataclass
class EncodedSupport:
    """The support side of the head, computed once (:meth:`DIFD.encode_support`) and reused for every query.

    Shape: ``feats (B, S, C, h, w)``, ``masks (B, S, H, W)`` (the features' dtype), ``t (B,)`` (shot 0's
    threshold), ``sets`` DI's basis sets of the shots that feed DI (``B·S'`` sources), ``proto_fg`` and
    ``proto_bg`` ``(B, C)`` (the global prototypes; only read with ``decoder_extra_maps``).
    """

    feats: Tensor
    masks: Tensor
    t: Tensor
    sets: PrototypeSets
    proto_fg: Tensor
    proto_bg: Tensor

    def episode(self, index: int) -> EncodedSupport:
        """Episode ``index`` alone (``B = 1``), e.g. one of several support slices encoded together."""
        one = slice(index, index + 1)
        per_episode = self.sets.fg.shape[0] // self.feats.shape[0]  # DI sources of one episode
        src = slice(index * per_episode, (index + 1) * per_episode)
        sets = PrototypeSets(
            self.sets.fg[src], self.sets.fg_valid[src], self.sets.bg[src], self.sets.bg_valid[src]
        )
        return EncodedSupport(
            self.feats[one], self.masks[one], self.t[one], sets, self.proto_fg[one], self.proto_bg[one]
        )


class DIFD(nn.Module):
    """Dual Interspersion and Flexible Deployment few-shot segmenter.

    Args:
        encoder: maps ``(N, 3, H, W)`` to ``((N, C, h, w), (N,))`` features and thresholds.
        fuse: the IFR module (owns the 1×1 fuse convolution).
        deployment: the FD module.
        interspersion: the DI module.
        decoder1: foreground decoder; decoder2: background decoder.
        multi_shot: ``'official'`` (shot 0 alone feeds DI and the fusion factor) or ``'all'`` (basis sets of
            all shots concatenated, fusion factor over the support pixels of all shots).
    """

    method = "difd"
    #: ``encoder.reduce2`` (2048 → 512 on layer4) is kept only so that official checkpoints load (the
    #: official code computes and discards it): it never receives a gradient.
    unused_parameters = ("encoder.reduce2.weight",)
    #: The official model's loss module is a weighted NLLLoss whose class weights are a buffer, hence a key of
    #: every official checkpoint.
    official_extras = {"criterion.weight": CLASS_WEIGHTS}

    def __init__(
        self,
        encoder: nn.Module,
        fuse: InteractiveFusionRefinement,
        deployment: FlexibleDeployment,
        interspersion: DualInterspersion,
        decoder1: Decoder,
        decoder2: Decoder,
        multi_shot: str = "official",
    ) -> None:
        super().__init__()
        if multi_shot not in MULTI_SHOT:
            raise ValueError(f"multi_shot: expected one of {MULTI_SHOT}, got {multi_shot!r}")
        self.encoder = encoder
        self.fuse = fuse
        self.deployment = deployment
        self.interspersion = interspersion
        self.decoder1 = decoder1
        self.decoder2 = decoder2
        self.multi_shot = multi_shot

    def forward(
        self, supp_imgs: Tensor, supp_masks: Tensor, qry_imgs: Tensor, align: bool | None = None
    ) -> DIFDOutput:
        """Segment the queries; with alignment (default: in training mode) also re-segment the supports.

        Shape: ``(B, S, 3, H, W)``, ``(B, S, H, W)``, ``(B, Q, 3, H, W)`` → ``DIFDOutput``.
        """
        check_episode(supp_imgs, supp_masks, qry_imgs)
        b, s = supp_imgs.shape[:2]
        q = qry_imgs.shape[1]
        # DI's mask-only plan holds its host synchronisation: made before the encoder is queued, it finds
        # an idle device instead of draining the encoder's work.
        plan = self._interspersion_plan(supp_masks.to(supp_imgs.dtype))
        # One encoder batch for supports and queries, as the official code (BatchNorm statistics in training).
        feats, t = self.encoder(torch.cat([supp_imgs.flatten(0, 1), qry_imgs.flatten(0, 1)]))
        supp_feats = feats[: b * s].unflatten(0, (b, s))
        qry_feats = feats[b * s :].unflatten(0, (b, q))
        t_supp = t[: b * s].view(b, s)[:, 0]  # support threshold = shot 0's
        t_qry = t[b * s :].view(b, q)
        masks = supp_masks.to(feats.dtype)
        query_probs = self.segment(supp_feats, masks, qry_feats, t_qry, t_supp, plan)
        if not (self.training if align is None else align):
            return DIFDOutput(query_probs)

        # Prototype alignment: the queries with their predicted masks become the support ("shots",
        # PANet-style; query 0 alone with multi_shot='official'), each support slice becomes a query. The
        # pseudo-mask threshold stays the query's (query 0's) and the deployment threshold the support's,
        # as in the forward. The alignment's DI plan needs the predicted mask: the one host
        # synchronisation of a training step that must wait for the device (the official SI sub-sample
        # draw depends on how many windows of the predicted mask qualify).
        pred_masks = (query_probs[:, :, 1] > query_probs[:, :, 0]).to(feats.dtype)  # argmax, ties → bg
        n_align = 1 if self.multi_shot == "official" else q
        align_masks = pred_masks[:, :n_align]
        align_valid = align_masks.flatten(1).any(1)
        support_probs = self.segment(
            qry_feats[:, :n_align],
            align_masks,
            supp_feats,
            t_qry[:, :1].expand(b, s),
            t_supp,
        )
        return DIFDOutput(query_probs, support_probs, align_valid)

    def encode_support(self, supp_imgs: Tensor, supp_masks: Tensor) -> EncodedSupport:
        """Encode a fixed support once: features, threshold, DI's basis sets and the global prototypes.

        The support is encoded on its own, so BatchNorm must use its running statistics (``eval()``).
        Shape: ``(B, S, 3, H, W)``, ``(B, S, H, W)`` in {0, 1} → :class:`EncodedSupport`.
        """
        check_support(supp_imgs, supp_masks)
        b, s = supp_imgs.shape[:2]
        plan = self._interspersion_plan(supp_masks.to(supp_imgs.dtype))  # before the encoder, as forward
        feats, t = self.encoder(supp_imgs.flatten(0, 1))
        return self.prepare_support(
            feats.unflatten(0, (b, s)), supp_masks.to(feats.dtype), t.view(b, s)[:, 0], plan
        )

    def encode_queries(self, qry_imgs: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder features and thresholds of query slices. Shape: ``(N, 3, H, W)`` → ``(N, C, h, w)``,
        ``(N,)``."""
        if qry_imgs.dim() != 4 or qry_imgs.shape[1] != 3 or not qry_imgs.is_floating_point():
            raise ValueError(f"qry_imgs: expected floating point (N, 3, H, W), got {tuple(qry_imgs.shape)}")
        return self.encoder(qry_imgs)

    def prepare_support(
        self,
        support_feats: Tensor,
        support_masks: Tensor,
        t_support: Tensor,
        plan: InterspersionPlan | None = None,
    ) -> EncodedSupport:
        """The support side of the head: DI's basis sets (shot 0, or all with ``multi_shot='all'``) and the
        global prototypes. Shape: ``(B, S, C, h, w)``, ``(B, S, H, W)``, ``(B,)`` → :class:`EncodedSupport`;
        ``plan``: DI's plan of ``support_masks`` (:meth:`_interspersion_plan`), made here when not given.
        """
        b, _, c = support_feats.shape[:3]
        n_di = 1 if self.multi_shot == "official" else support_feats.shape[1]
        if plan is None:
            plan = self._interspersion_plan(support_masks)
        sets = self.interspersion(support_feats[:, :n_di].flatten(0, 1), plan=plan)
        if self.deployment.extra_maps:
            proto_fg, proto_bg = self._global_prototypes(support_feats, support_masks)
        else:
            proto_fg = proto_bg = support_feats.new_zeros(b, c)  # only read with extra maps
        return EncodedSupport(support_feats, support_masks, t_support, sets, proto_fg, proto_bg)

    def segment_encoded(self, support: EncodedSupport, query_feats: Tensor, t_query: Tensor) -> Tensor:
        """The per-query part of the head against an encoded support: IFR + FD per query, decoders,
        [bg, fg] softmax at the support masks' size.

        Shape: ``query_feats (B, Q, C, h, w)``, ``t_query (B, Q)`` → ``(B, Q, 2, H, W)``.
        """
        b, q, c = query_feats.shape[:3]
        image_size = tuple(support.masks.shape[-2:])
        n_di = 1 if self.multi_shot == "official" else support.feats.shape[1]
        di_feats = support.feats[:, :n_di]
        di_masks = support.masks[:, :n_di]
        sets = support.sets
        branch_feats = []
        for basis, valid, branch_masks, proto in (
            (sets.fg, sets.fg_valid, di_masks, support.proto_fg),
            (sets.bg, sets.bg_valid, 1 - di_masks, support.proto_bg),
        ):
            basis = basis.view(b, -1, c)  # shots' sets side by side ('all') or shot 0's
            valid = valid.view(b, -1)
            refined = self.fuse(basis, query_feats, t_query, di_feats, branch_masks)
            branch_feats.append(self.deployment(refined, valid, query_feats, support.t, proto).flatten(0, 1))
        fg_logits = self.decoder1(branch_feats[0])
        bg_logits = self.decoder2(branch_feats[1])
        logits = torch.cat([bg_logits, fg_logits], 1)
        logits = F.interpolate(logits, size=image_size, mode="bilinear", align_corners=True)
        return torch.softmax(logits, dim=1).view(b, q, 2, *image_size)

    def segment(
        self,
        support_feats: Tensor,
        support_masks: Tensor,
        query_feats: Tensor,
        t_query: Tensor,
        t_support: Tensor,
        plan: InterspersionPlan | None = None,
    ) -> Tensor:
        """The head: DI on the support, IFR + FD per query, decoders, [bg, fg] softmax.

        Shape: ``support_feats (B, S, C, h, w)``, ``support_masks (B, S, H, W)``,
        ``query_feats (B, Q, C, h, w)``, ``t_query (B, Q)``, ``t_support (B,)`` → ``(B, Q, 2, H, W)``;
        ``plan``: DI's plan of ``support_masks`` (:meth:`_interspersion_plan`), made here when not given.
        """
        support = self.prepare_support(support_feats, support_masks, t_support, plan)
        return self.segment_encoded(support, query_feats, t_query)

    def _interspersion_plan(self, support_masks: Tensor) -> InterspersionPlan:
        """DI's mask-only plan for the shots that feed DI (shot 0, or all with ``multi_shot='all'``).

        Shape: ``support_masks (B, S, H, W)`` → plan over ``B·S'`` sources.
        """
        n_di = 1 if self.multi_shot == "official" else support_masks.shape[1]
        fg_on = support_masks.flatten(1).any(1)  # per episode over all shots, as the official code decides
        return self.interspersion.plan(support_masks[:, :n_di].flatten(0, 1), fg_on.repeat_interleave(n_di))

    @staticmethod
    def _global_prototypes(support_feats: Tensor, support_masks: Tensor) -> tuple[Tensor, Tensor]:
        """MAP fg/bg prototypes of the upsampled features, averaged over shots (method.md §4.2).

        Shape: ``(B, S, C, h, w)``, ``(B, S, H, W)`` → ``(B, C)``, ``(B, C)``.
        """
        b, s, c = support_feats.shape[:3]
        feats = support_feats.flatten(0, 1)
        fg = support_masks.flatten(0, 1)
        proto_fg = masked_sum(feats, fg) / (fg.sum((1, 2)).unsqueeze(1) + MAP_EPS)
        proto_bg = masked_sum(feats, 1 - fg) / ((1 - fg).sum((1, 2)).unsqueeze(1) + MAP_EPS)
        return proto_fg.view(b, s, c).mean(1), proto_bg.view(b, s, c).mean(1)
