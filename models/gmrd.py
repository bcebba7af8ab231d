"""GMRD (Cheng et al., IEEE TMI 2024, "Few-shot medical image segmentation via generating multiple
representative descriptors"): encoder → multiple representative descriptors of the support's foreground and
background → similarity maps of the query against every descriptor → fg/bg decoders, plus the
prototype-alignment pass of the training loss. docs/methods.md §GMRD says what differs from the official code.

Steps (paper names; shapes per episode, ``C`` channels, ``h w`` features, ``H W`` slices):

1. **Feature extraction**: the shared ResNet-101 encoder (:mod:`models.encoder`), ``(N, 3, H, W)`` →
   ``(N, C, h, w)`` and a threshold ``t (N,)`` (used only by the empty-support fallback, step 5).
2. **Multiple representative descriptors generation** (:class:`DescriptorGenerator`): the support features,
   upsampled to ``H x W``, with every pixel outside the region (foreground or background) replaced by the
   feature of a randomly drawn pixel inside it (:func:`fill_index`), are mapped by a linear layer over the
   ``H·W`` pixels (then dropout and a second linear layer) to ``K`` descriptors ``(K, C)``: ``K = 100`` for
   the foreground (``mlp1``), ``600`` for the background (``mlp2``).
3. **Global and edge prototypes**: the masked average of the region and of its edge (:func:`edge_masks`:
   the inner edge ``M - erode(M)`` for the foreground; for the background the official ``dilate(1 - M) - M``
   or the paper's outer edge ``dilate(M) - M``) join the descriptors: ``(K + 2, C)``, averaged over shots.
4. **Descriptor similarity and decoding**: the cosine maps of the query features against the ``K + 2``
   fg (bg) descriptors ``(K + 2, h, w)`` are decoded by ``decoder1`` (``decoder2``) to a logit map; the two
   logits, upsampled to ``H x W``, give the [bg, fg] softmax.
5. **Empty-support fallback** (official code): an episode whose support masks are all empty is segmented as
   in ADNet, ``p_fg = 1 - σ(0.5·(-20·cos(F_q, p) - t_q))`` with ``p`` the (zero) masked average.
6. **Prototype alignment** (training): the query's predicted mask makes the query a support, its descriptors
   are drawn anew for every shot (as the official loop does) and every support slice is re-segmented.

The model keeps no per-call state; the random draws of step 2 come from torch's global stream on the
features' device (the harness seeds and snapshots it), in eval mode too, as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.losses import CLASS_WEIGHTS, IGNORE_INDEX, check_query_labels, clamped_log
from models.methods import FewShotOutput, check_episode, check_support
from models.prototypes import bilinear_weights, cosine_map, masked_average, upsample

#: Descriptor counts of the official model (``fg_num``, ``bg_num``).
FG_DESCRIPTORS = 100
BG_DESCRIPTORS = 600
#: Width of the official decoders' last 3×3 convolution.
DOWN_DIM = 100
#: Cosine scale of the fallback's threshold prediction (official ``scaler``).
SCALER = 20.0
#: ``edge_masks``: the official background edge ``dilate(1 - M) - M``, or the paper's ``dilate(M) - M``.
EDGE_MASKS = ("official", "paper")
#: Two 3×3 erosions / dilations (official ``iterations=2``) are one 5×5 one.
EDGE_KERNEL = 5
#: ``F.normalize``'s norm floor (descriptor similarities) and ``F.cosine_similarity``'s (fallback).
NORMALIZE_EPS = 1e-12
COSINE_EPS = 1e-8


@dataclass
class GMRDOutput(FewShotOutput):
    """``query_probs (B, Q, 2, H, W)``; in training also ``support_probs (B, S, 2, H, W)`` (the alignment
    predictions of the support slices from query 0) and ``align_valid (B,)`` (False where query 0's
    predicted mask is empty: the official code skips those episodes)."""

    support_probs: Tensor | None = None
    align_valid: Tensor | None = None


@dataclass
class GMRDSupport:
    """A support encoded once (:meth:`GMRD.encode_support`).

    ``fg (B, K_fg + 2, C)`` and ``bg (B, K_bg + 2, C)``: the shot-averaged descriptors (None when every
    episode takes the fallback), ``prototype (B, C)``: the fallback's masked average (None when no episode
    does), ``empty (B,)``: the episodes whose support masks are all empty, ``size``: the slices' ``(H, W)``.
    """

    fg: Tensor | None
    bg: Tensor | None
    prototype: Tensor | None
    empty: Tensor
    size: tuple[int, int]

    def episode(self, index: int) -> GMRDSupport:
        """Episode ``index`` alone (``B = 1``)."""

        def one(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[index : index + 1]

        return GMRDSupport(one(self.fg), one(self.bg), one(self.prototype), one(self.empty), self.size)


def fill_order(region: Tensor) -> Tensor:
    """The region's pixels first, in a uniformly random order (then the others): the official
    ``random.sample`` over the region's pixels, drawn for all sources at once.

    Shape: ``region (N, P)`` bool → ``(N, P)`` pixel indices.
    """
    keys = torch.rand(region.shape, dtype=torch.float64, device=region.device)
    return torch.where(region, keys, 2.0).argsort(dim=1)


def fill_index(region: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """Which pixel's feature stands at each pixel once the outside of the region is filled (official
    ``get_fg_fts`` / ``get_random_pts``): a region pixel keeps its own; the ``j``-th outside pixel (raster
    order) takes ``order[j]`` while the region has at least as many pixels as the outside, otherwise the
    first ``n_out mod n_in`` outside pixels take drawn ones and the rest the region's pixels in raster order,
    cyclically. An empty region fills with zeros (``keep`` False).

    Shape: ``region (N, P)`` bool, ``order (N, P)`` (:func:`fill_order`) → ``index (N, P)``, ``keep (N, P)``.
    """
    n_pixels = region.shape[1]
    pixels = torch.arange(n_pixels, device=region.device).expand_as(region)
    n_in = region.sum(1, keepdim=True)
    n_out = n_pixels - n_in
    outside = ~region
    rank = outside.long().cumsum(1) - 1  # j of each outside pixel
    raster = torch.argsort(outside.to(torch.int8), dim=1, stable=True)  # region pixels in raster order
    rem = n_out % n_in.clamp(min=1)
    cyclic = (n_in < n_out) & (rank >= rem)
    source = torch.where(
        cyclic,
        raster.gather(1, ((rank - rem) % n_in.clamp(min=1)).clamp(min=0)),
        order.gather(1, rank.clamp(min=0)),
    )
    index = torch.where(region, pixels, source)
    keep = region | (n_in > 0)
    return index, keep


def edge_masks(masks: Tensor, kind: str = "official") -> tuple[Tensor, Tensor]:
    """Inner edge of the foreground, ``M - erode(M)``, and the background's edge: ``dilate(1 - M) - M``
    (``'official'``; equal to ``1 - M`` minus the foreground's interior, not an edge) or the outer edge
    ``dilate(M) - M`` (``'paper'``). Erosion and dilation by a 5×5 square (two 3×3 passes), pixels beyond
    the border neutral (OpenCV's default border).

    Shape: ``(N, H, W)`` → ``(N, H, W)``, ``(N, H, W)``.
    """
    m = masks.unsqueeze(1)
    pad = EDGE_KERNEL // 2
    inner = m + F.max_pool2d(-m, EDGE_KERNEL, stride=1, padding=pad)
    grown = 1 - m if kind == "official" else m
    outer = F.max_pool2d(grown, EDGE_KERNEL, stride=1, padding=pad) - m
    return inner.squeeze(1), outer.squeeze(1)


class DescriptorGenerator(nn.Module):
    """The official ``MLP``: ``reduce`` = Linear(``size²`` → K), Dropout(0.2), Linear(K → K), applied to each
    channel of the filled, upsampled features (step 2).

    The upsampled features are never formed: the first layer's weights are gathered onto the pixels whose
    features fill each position and contracted with the bilinear upsampling matrices (as
    :func:`models.prototypes.masked_sum` does for one mask).

    Shape: ``feats (N, C, h, w)``, ``region (N, H, W)`` in {0, 1} with ``H = W = size`` → ``(N, K, C)``.
    """

    def __init__(self, size: int, count: int) -> None:
        super().__init__()
        self.size = size
        self.reduce = nn.Sequential(nn.Linear(size * size, count), nn.Dropout(p=0.2), nn.Linear(count, count))

    def forward(self, feats: Tensor, region: Tensor) -> Tensor:
        n, _, h, w = feats.shape
        height, width = region.shape[-2:]
        inside = region.flatten(1) > 0.5
        index, keep = fill_index(inside, fill_order(inside))
        first = self.reduce[0]
        count = first.out_features
        weights = first.weight.unsqueeze(0) * keep.unsqueeze(1).to(feats.dtype)  # (N, K, H·W)
        spread = torch.zeros_like(weights).scatter_add(2, index.unsqueeze(1).expand_as(weights), weights)
        u_h = bilinear_weights(height, h, feats.device).to(feats.dtype)
        u_w = bilinear_weights(width, w, feats.device).to(feats.dtype)
        kernel = u_h.t() @ spread.view(n, count, height, width) @ u_w  # (N, K, h, w)
        out = torch.einsum("nchw,nkhw->nck", feats, kernel) + first.bias
        return self.reduce[2](self.reduce[1](out)).transpose(1, 2)


class DescriptorDecoder(nn.Module):
    """The official ``Decoder`` of the similarity maps (step 4): res1 (1×1 → K, ReLU), res2 (two 3×3 with
    ReLU) added to its input, down (3×3 → 100, ReLU, Dropout2d 0.1, 1×1 → 1). No biases.

    Shape: ``(N, K + 2, h, w)`` → ``(N, 1, h, w)``.
    """

    def __init__(self, count: int, down_dim: int = DOWN_DIM) -> None:
        super().__init__()
        self.res1 = nn.Sequential(
            nn.Conv2d(count + 2, count, kernel_size=1, bias=False), nn.ReLU(inplace=True)
        )
        self.res2 = nn.Sequential(
            nn.Conv2d(count, count, kernel_size=3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(count, count, kernel_size=3, padding=1, bias=False),
            nn.ReLU(inplace=True),
        )
        self.down = nn.Sequential(
            nn.Conv2d(count, down_dim, kernel_size=3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.1),
            nn.Conv2d(down_dim, 1, kernel_size=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.res1(x)
        return self.down(self.res2(x) + x)


class GMRD(nn.Module):
    """GMRD few-shot segmenter (module docstring).

    Args:
        encoder: maps ``(N, 3, H, W)`` to ``((N, C, h, w), (N,))`` features and thresholds.
        mlp1, mlp2: the foreground and background :class:`DescriptorGenerator`.
        decoder1, decoder2: the foreground and background :class:`DescriptorDecoder`.
        edge_masks: ``'official'`` or ``'paper'`` background edge (:func:`edge_masks`).
    """

    method = "gmrd"
    #: ``encoder.reduce2`` is computed and discarded by the official encoder; kept so checkpoints load.
    unused_parameters = ("encoder.reduce2.weight",)
    #: The official model's losses (an unweighted NLLLoss and an MSELoss) hold no buffers.
    official_extras = {}

    def __init__(
        self,
        encoder: nn.Module,
        mlp1: DescriptorGenerator,
        mlp2: DescriptorGenerator,
        decoder1: DescriptorDecoder,
        decoder2: DescriptorDecoder,
        edge_masks: str = "official",
    ) -> None:
        super().__init__()
        if edge_masks not in EDGE_MASKS:
            raise ValueError(f"edge_masks: expected one of {EDGE_MASKS}, got {edge_masks!r}")
        self.encoder = encoder
        self.mlp1 = mlp1
        self.mlp2 = mlp2
        self.decoder1 = decoder1
        self.decoder2 = decoder2
        self.edge_masks = edge_masks

    def _check_size(self, images: Tensor) -> None:
        size = self.mlp1.size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"GMRD's descriptor layers take {size}x{size} slices (mlp_size={size}), got "
                f"{images.shape[-2]}x{images.shape[-1]}"
            )

    def forward(
        self, supp_imgs: Tensor, supp_masks: Tensor, qry_imgs: Tensor, align: bool | None = None
    ) -> GMRDOutput:
        """Segment the queries; with alignment (default: in training mode) also re-segment the supports.

        Shape: ``(B, S, 3, H, W)``, ``(B, S, H, W)``, ``(B, Q, 3, H, W)`` → :class:`GMRDOutput`.
        """
        check_episode(supp_imgs, supp_masks, qry_imgs)
        self._check_size(supp_imgs)
        b, s = supp_imgs.shape[:2]
        q = qry_imgs.shape[1]
        # One encoder batch for supports and queries (BatchNorm statistics in training, as official).
        feats, t = self.encoder(torch.cat([supp_imgs.flatten(0, 1), qry_imgs.flatten(0, 1)]))
        supp_feats = feats[: b * s].unflatten(0, (b, s))
        qry_feats = feats[b * s :].unflatten(0, (b, q))
        t_qry = t[b * s :].view(b, q)
        support = self.prepare_support(supp_feats, supp_masks.to(feats.dtype))
        query_probs = self.segment_encoded(support, qry_feats, t_qry)
        if not (self.training if align is None else align):
            return GMRDOutput(query_probs)

        # Alignment: query 0 with its predicted mask (argmax, ties → bg) becomes a one-shot support, once per
        # support shot (fresh descriptor draws each, as the official per-shot loop), and each support slice
        # is segmented against it with query 0's threshold; each episode keeps its branch (step 5).
        pred = (query_probs[:, 0, 1] > query_probs[:, 0, 0]).to(feats.dtype)  # (B, H, W)
        align_valid = pred.flatten(1).any(1)
        shots = supp_feats.flatten(0, 1).unsqueeze(1)  # (B·S, 1, C, h, w): one query each
        flipped = self.prepare_support(
            qry_feats[:, :1].repeat_interleave(s, 0).view_as(shots),
            pred.repeat_interleave(s, 0).unsqueeze(1),
            empty=support.empty.repeat_interleave(s, 0),
        )
        support_probs = self.segment_encoded(flipped, shots, t_qry[:, :1].repeat_interleave(s, 0))
        return GMRDOutput(query_probs, support_probs.view(b, s, *support_probs.shape[2:]), align_valid)

    def encode_support(self, supp_imgs: Tensor, supp_masks: Tensor) -> GMRDSupport:
        """Encode a fixed support once (eval mode: BatchNorm running statistics).

        Shape: ``(B, S, 3, H, W)``, ``(B, S, H, W)`` in {0, 1} → :class:`GMRDSupport`.
        """
        check_support(supp_imgs, supp_masks)
        self._check_size(supp_imgs)
        b, s = supp_imgs.shape[:2]
        feats, _ = self.encoder(supp_imgs.flatten(0, 1))
        return self.prepare_support(feats.unflatten(0, (b, s)), supp_masks.to(feats.dtype))

    def encode_queries(self, qry_imgs: Tensor) -> tuple[Tensor, Tensor]:
        """Features and thresholds of query slices. Shape: ``(N, 3, H, W)`` → ``(N, C, h, w)``, ``(N,)``."""
        if qry_imgs.dim() != 4 or qry_imgs.shape[1] != 3 or not qry_imgs.is_floating_point():
            raise ValueError(f"qry_imgs: expected floating point (N, 3, H, W), got {tuple(qry_imgs.shape)}")
        return self.encoder(qry_imgs)

    def prepare_support(
        self, support_feats: Tensor, support_masks: Tensor, empty: Tensor | None = None
    ) -> GMRDSupport:
        """Steps 2, 3 and 5's prototype. Shape: ``(B, S, C, h, w)``, ``(B, S, H, W)`` → :class:`GMRDSupport`;
        ``empty (B,)``: the episodes on the fallback (default: those whose masks are all empty).

        A branch no episode takes is not computed, so that its parameters get no gradient (SGD then skips
        them, weight decay included, as in the official code): one host synchronisation.
        """
        b, s = support_feats.shape[:2]
        if empty is None:
            empty = support_masks.flatten(1).sum(1) == 0
        any_empty, any_full = torch.stack([empty.any(), (~empty).any()]).tolist()
        feats = support_feats.flatten(0, 1)
        masks = support_masks.flatten(0, 1)
        fg = bg = prototype = None
        if any_full:
            fg, bg = self.descriptors(feats, masks)
            fg = fg.unflatten(0, (b, s)).mean(1)
            bg = bg.unflatten(0, (b, s)).mean(1)
        if any_empty:
            prototype = masked_average(feats, masks).unflatten(0, (b, s)).mean(1)
        return GMRDSupport(fg, bg, prototype, empty, tuple(masks.shape[-2:]))

    def descriptors(self, feats: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 2-3 for each source: ``[descriptors, global prototype, edge prototype]`` of the foreground
        and of the background. Shape: ``(N, C, h, w)``, ``(N, H, W)`` → ``(N, K_fg + 2, C)``,
        ``(N, K_bg + 2, C)``."""
        inner, outer = edge_masks(masks, self.edge_masks)
        background = 1 - masks
        fg = torch.cat(
            [
                self.mlp1(feats, masks),
                masked_average(feats, masks).unsqueeze(1),
                masked_average(feats, inner).unsqueeze(1),
            ],
            1,
        )
        bg = torch.cat(
            [
                self.mlp2(feats, background),
                masked_average(feats, background).unsqueeze(1),
                masked_average(feats, outer).unsqueeze(1),
            ],
            1,
        )
        return fg, bg

    def segment_encoded(self, support: GMRDSupport, query_feats: Tensor, t_query: Tensor) -> Tensor:
        """Steps 4-5 for every query against an encoded support, each episode on its branch.

        Shape: ``query_feats (B, Q, C, h, w)``, ``t_query (B, Q)`` → ``(B, Q, 2, H, W)``.
        """
        b, q = query_feats.shape[:2]
        feats = query_feats.flatten(0, 1)
        probs = None
        if support.fg is not None:
            fg_logit = self.decoder1(cosine_map(feats, support.fg.repeat_interleave(q, 0), NORMALIZE_EPS))
            bg_logit = self.decoder2(cosine_map(feats, support.bg.repeat_interleave(q, 0), NORMALIZE_EPS))
            logits = upsample(torch.cat([bg_logit, fg_logit], 1), support.size)
            probs = torch.softmax(logits, dim=1)
        if support.prototype is not None:
            proto = support.prototype.repeat_interleave(q, 0).unsqueeze(1)
            sim = -cosine_map(feats, proto, COSINE_EPS) * SCALER
            fg = upsample(1.0 - torch.sigmoid(0.5 * (sim - t_query.reshape(-1, 1, 1, 1))), support.size)
            fallback = torch.cat([1.0 - fg, fg], 1)
            if probs is None:
                probs = fallback
            else:
                empty = support.empty.repeat_interleave(q, 0).view(-1, 1, 1, 1)
                probs = torch.where(empty, fallback, probs)
        return probs.view(b, q, *probs.shape[1:])


class GMRDLoss(nn.Module):
    """The official GMRD loss: ``query_nll``, the weighted NLL (class weights ``[0.1, 1.0]``, ignore index
    255) of the query prediction, one mean over all pixels; ``align_nll``, per episode the *unweighted* NLL
    of each support slice's alignment prediction against its mask, averaged over shots, summed over the
    episodes whose predicted query mask was not empty and divided by ``B``. Both on
    ``log(clamp(p, eps, 1 - eps))``; a weight of 0 switches a term off.

    Shape: ``out.query_probs (B, Q, 2, H, W)``, ``qry_labels (B, Q, H, W)``, ``supp_masks (B, S, H, W)`` →
    dict of 0-d tensors ``query_nll``, ``align_nll``, ``total``.
    """

    def __init__(self, query_nll: float = 1.0, align_nll: float = 1.0) -> None:
        super().__init__()
        self.weights = {"query_nll": float(query_nll), "align_nll": float(align_nll)}
        self.register_buffer("class_weights", torch.tensor(CLASS_WEIGHTS), persistent=False)

    def forward(self, out: GMRDOutput, qry_labels: Tensor, supp_masks: Tensor) -> dict[str, Tensor]:
        probs = out.query_probs
        check_query_labels(probs, qry_labels)
        b = probs.shape[0]
        terms = {
            "query_nll": F.nll_loss(
                clamped_log(probs.flatten(0, 1)),
                qry_labels.flatten(0, 1).long(),
                weight=self.class_weights.to(probs.dtype),
                ignore_index=IGNORE_INDEX,
            )
        }
        if out.support_probs is None or self.weights["align_nll"] == 0:
            terms["align_nll"] = probs.new_zeros(())
        else:
            sp = out.support_probs
            if supp_masks.shape != sp.shape[:2] + sp.shape[3:]:
                raise ValueError(
                    f"supp_masks: expected shape {tuple(sp.shape[:2] + sp.shape[3:])}, "
                    f"got {tuple(supp_masks.shape)}"
                )
            pixel = F.nll_loss(
                clamped_log(sp.flatten(0, 1)), supp_masks.flatten(0, 1).long(), reduction="none"
            )
            per_shot = pixel.mean((1, 2)).view(b, -1).mean(1)
            valid = out.align_valid if out.align_valid is not None else torch.ones_like(per_shot, dtype=bool)
            terms["align_nll"] = torch.where(valid, per_shot, 0.0).sum() / b
        terms["total"] = sum(self.weights[name] * terms[name] for name in self.weights)
        return terms
