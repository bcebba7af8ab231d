"""Dual Interspersion (DI, method.md §4.3): the foreground and background basis sets of one support image.

Each set is ``[DI global, SI windows…, RI boxes…]``:

- global: masked average of the upsampled support features (``Σ F·M / (n + 1e-5)``);
- Sliding Interspersion (SI): windows of 16×8 pixels, stride 8, kept when they hold enough pixels of the
  branch (fg: ``≥ min(16·8·0.95, n_fg/150)``, only when the episode's support mask is non-empty; bg:
  ``≥ min(16·8, n_bg/250)``), sub-sampled to 150 (fg) / 250 (bg), or replaced by at most 100 single pixel
  features when no window qualifies;
- Random Interspersion (RI): 100 random boxes, fg prototype when ``n1 ≥ min(0.95·area, n_fg/100)`` and
  ``n1 < n_fg``, bg prototype when ``n0 ≥ min(area, n_bg/100)`` and ``n0 < n_bg``.

Vectorised, without ever forming the upsampled features: bilinear upsampling is linear, so the sum of the
upsampled features over (mask ∘ rectangle) is ``F`` contracted with the low-resolution kernel
``U_hᵀ (M ∘ 1_rect) U_w`` (``U`` the 1-D interpolation matrices). The kernels of the chosen rectangles come
from running sums of ``M·U_w`` along the mask columns (float64, so their differences are exact) and one
row-restricted matmul; pixel counts come from a float64 summed-area table of the mask. Only the final
``kernel @ F`` matmul carries gradient. The sets are padded ``(N, P, C)`` tensors with ``(N, P)`` validity
masks (invalid rows are zero). The random choices reproduce the official seed-9 draws with local generators
(``region_sampling='official'``) or draw fresh ones per call (``'random'``); the process-wide RNGs are only
read (never re-seeded), and only in ``'random'`` mode.

Shape: features ``(N, C, h, w)``, masks ``(N, H, W)`` in {0, 1}, per-source SI-fg flag ``(N,)`` →
``PrototypeSets`` with ``fg (N, Pf, C)``, ``fg_valid (N, Pf)``, ``bg (N, Pb, C)``, ``bg_valid (N, Pb)``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.prototypes import MAP_EPS, bilinear_weights

WINDOW = (16, 8)
WINDOW_STRIDE = 8
FG_WINDOW_RATE = 0.95
FG_WINDOW_DIVISOR = 150
BG_WINDOW_DIVISOR = 250
FG_WINDOW_CAP = 150
BG_WINDOW_CAP = 250
PIXEL_CAP = 100
N_BOXES = 100
BOX_DIVISOR = 100
BOX_FG_RATE = 0.95
ASPECT_RATIO_RANGE = (0.5, 2.0)
BOX_MIN_FRACTION = 0.0625
OFFICIAL_SEED = 9
REGION_SAMPLING = ("official", "random")


@dataclass
class PrototypeSets:
    """Padded basis-prototype sets. Shape: ``fg (N, Pf, C)``, ``fg_valid (N, Pf)``, ``bg (N, Pb, C)``,
    ``bg_valid (N, Pb)``; invalid rows are zero."""

    fg: Tensor
    fg_valid: Tensor
    bg: Tensor
    bg_valid: Tensor


@dataclass
class BranchPlan:
    """Mask-only description of one branch's padded set ``[global, SI…, RI…]``.

    Shape: ``rect_index (N, P)`` (row of ``InterspersionPlan.rects``), ``si_pixel (N, P)`` (entry is a
    single pixel feature, SI fallback), ``pixel (N, Kmax)`` row-major pixel indices or None when no source
    fell back to pixels, ``valid (N, P)``, ``scale (N, P)`` float64 (``1 / (count + 1e-5)``, 1 for pixel
    entries, 0 for invalid entries).
    """

    rect_index: Tensor
    si_pixel: Tensor
    pixel: Tensor | None
    valid: Tensor
    scale: Tensor


@dataclass
class InterspersionPlan:
    """What DI decides from the masks alone (:meth:`DualInterspersion.plan`).

    Shape: ``mask (N, H, W)`` float64, ``rects (K, 4)`` int64 ``(row0, row1, col0, col1)`` end exclusive
    (whole image, SI windows, RI boxes), ``fg`` / ``bg`` branch plans.
    """

    mask: Tensor
    rects: Tensor
    fg: BranchPlan
    bg: BranchPlan


def draw_boxes(
    height: int, width: int, seed: int, n_boxes: int = N_BOXES
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RI boxes as the official code draws them from a torch CPU generator seeded with ``seed``.

    Draw order: aspect ratios, ``u`` of the ``r ≤ 1`` boxes, ``u`` of the ``r > 1`` boxes, the row corners,
    the column corners; float32 arithmetic in the official order, ``int`` truncating toward zero. Boxes are
    listed ``r ≤ 1`` first. For non-square images the official formula can leave the image (the official code
    then slices with negative indices); here such boxes are clipped to the image. Square images never clip.

    Returns CPU int64 tensors ``(row0, row1, col0, col1)`` (end exclusive), each ``(n_boxes,)``.
    """
    g = torch.Generator().manual_seed(seed)
    lo, hi = ASPECT_RATIO_RANGE
    ratio = torch.rand(n_boxes, generator=g) * (hi - lo) + lo
    ratio0 = ratio[ratio <= 1]
    box_h0 = (
        (torch.rand(len(ratio0), generator=g) * (1 - BOX_MIN_FRACTION) + BOX_MIN_FRACTION) * (height * ratio0)
    ).int()
    box_w0 = (box_h0 / ratio0).int()
    ratio1 = ratio[ratio > 1]
    box_w1 = (
        (torch.rand(len(ratio1), generator=g) * (1 - BOX_MIN_FRACTION) + BOX_MIN_FRACTION) * (width / ratio1)
    ).int()
    box_h1 = (box_w1 * ratio1).int()
    box_h = torch.cat([box_h0, box_h1])
    box_w = torch.cat([box_w0, box_w1])
    row0 = (torch.rand(n_boxes, generator=g) * (height - box_h)).int()
    col0 = (torch.rand(n_boxes, generator=g) * (width - box_w)).int()
    row1 = row0 + box_h
    col1 = col0 + box_w
    return tuple(
        t.long().clamp(0, limit)
        for t, limit in ((row0, height), (row1, height), (col0, width), (col1, width))
    )


_official_boxes = functools.lru_cache(maxsize=32)(draw_boxes)


def window_grid(height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SI windows (16×8, stride 8) in row-major order of their top-left corners, as ``F.unfold`` lists them.

    Returns CPU int64 ``(row0, row1, col0, col1)`` (end exclusive), each ``(n_windows,)`` (0 when the image is
    smaller than a window).
    """
    kh, kw = WINDOW
    n_rows = max((height - kh) // WINDOW_STRIDE + 1, 0)
    n_cols = max((width - kw) // WINDOW_STRIDE + 1, 0)
    row0 = (torch.arange(n_rows) * WINDOW_STRIDE).repeat_interleave(n_cols)
    col0 = (torch.arange(n_cols) * WINDOW_STRIDE).repeat(n_rows)
    return row0, row0 + kh, col0, col0 + kw


@functools.lru_cache(maxsize=4096)
def subsample_plan(
    fg_on: bool, n_fg_windows: int, n_fg_pixels: int, n_bg_windows: int, n_bg_pixels: int, seed: int
) -> tuple[str, tuple[int, ...], str, tuple[int, ...]]:
    """SI sub-sampling of one source with ``random.Random(seed)`` semantics of the official code.

    The generator is seeded at the start; the fg sample is drawn first, then the bg sample; the pixel
    fallback re-seeds with ``seed`` before its draw. Returns, per branch, the kind (``'window'``/``'pixel'``)
    and the chosen ordinals among the qualifying windows or branch pixels (row-major), in draw order.
    """
    rng = random.Random(seed)

    def choose(n_windows: int, n_pixels: int, cap: int) -> tuple[str, tuple[int, ...]]:
        if n_windows == 0:
            if n_pixels > PIXEL_CAP:
                rng.seed(seed)
                return "pixel", tuple(rng.sample(range(n_pixels), PIXEL_CAP))
            return "pixel", tuple(range(n_pixels))
        if n_windows > cap:
            return "window", tuple(rng.sample(range(n_windows), cap))
        return "window", tuple(range(n_windows))

    fg_kind, fg_ordinals = choose(n_fg_windows, n_fg_pixels, FG_WINDOW_CAP) if fg_on else ("window", ())
    bg_kind, bg_ordinals = choose(n_bg_windows, n_bg_pixels, BG_WINDOW_CAP)
    return fg_kind, fg_ordinals, bg_kind, bg_ordinals


def _summed_area_table(x: Tensor) -> Tensor:
    """Zero-padded float64 summed-area table. Shape: ``(..., H, W)`` → ``(..., H+1, W+1)``."""
    return nn.functional.pad(x.double().cumsum(-2).cumsum(-1), (1, 0, 1, 0))


def _rect_sums(sat: Tensor, rects: Tensor) -> Tensor:
    """Sums over rectangles ``(row0, row1, col0, col1)`` (end exclusive) of a zero-padded summed-area table.

    Shape: ``sat (N, H+1, W+1)``, ``rects (K, 4)`` → ``(N, K)``.
    """
    row0, row1, col0, col1 = rects.unbind(1)
    stride = sat.shape[-1]
    flat = sat.flatten(-2)
    return (
        flat[:, row1 * stride + col1]
        - flat[:, row0 * stride + col1]
        - flat[:, row1 * stride + col0]
        + flat[:, row0 * stride + col0]
    )


def _kth_true(flags: Tensor, ranks: Tensor) -> Tensor:
    """Index of the ``ranks``-th True entry of each row (0-based), found on the device.

    Shape: ``flags (N, K)`` bool, ``ranks (N, P)`` → ``(N, P)`` (clamped to ``K - 1`` past the end).
    """
    running = flags.long().cumsum(1)
    return torch.searchsorted(running, ranks + 1).clamp(max=max(flags.shape[1] - 1, 0))


def _padded(ordinals: list[tuple[int, ...]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Host plan → ``(N, P)`` ranks and validity on the device (one small copy)."""
    width = max((len(o) for o in ordinals), default=0)
    ranks = torch.zeros(len(ordinals), width, dtype=torch.long)
    valid = torch.zeros(len(ordinals), width, dtype=torch.bool)
    for i, o in enumerate(ordinals):  # integer bookkeeping on the host; no tensor work per source
        ranks[i, : len(o)] = torch.tensor(o, dtype=torch.long)
        valid[i, : len(o)] = True
    return ranks.to(device), valid.to(device)


class DualInterspersion(nn.Module):
    """Dual Interspersion: fg and bg basis-prototype sets of each source image (no parameters).

    The features are never upsampled explicitly: bilinear upsampling is linear, so the sum of the upsampled
    features over a rectangle of the mask equals ``F`` contracted with the low-resolution kernel
    ``U_hᵀ (M ∘ 1_rect) U_w``. That kernel is built per chosen rectangle from running sums over the mask
    columns (float64, exact differences) and a row-restricted matmul; the one matmul with ``F`` is the only
    step that carries gradient.

    Args:
        region_sampling: ``'official'`` (fixed seed-9 draws, method.md §4.3) or ``'random'`` (fresh seed per
            call, taken from the process-wide torch RNG so that ``set_seed`` makes runs repeatable).
    """

    def __init__(self, region_sampling: str = "official") -> None:
        super().__init__()
        if region_sampling not in REGION_SAMPLING:
            raise ValueError(f"region_sampling: expected one of {REGION_SAMPLING}, got {region_sampling!r}")
        self.region_sampling = region_sampling

    def _seed_and_boxes(self, height: int, width: int) -> tuple[int, tuple[Tensor, Tensor, Tensor, Tensor]]:
        if self.region_sampling == "official":
            return OFFICIAL_SEED, _official_boxes(height, width, OFFICIAL_SEED)
        seed = int(torch.randint(2**31 - 1, (1,)))
        return seed, draw_boxes(height, width, seed)

    def plan(self, masks: Tensor, fg_on: Tensor) -> InterspersionPlan:
        """Everything DI decides from the masks alone: pixel counts, qualifying windows and boxes, the SI
        sub-sample plan, and for every entry of both sets its rectangle, validity and normalisation.

        This holds DI's one host synchronisation (the SI sub-sample sizes depend on how many windows
        qualify). Called on the support masks before the encoder is queued, it finds an idle device.
        Shape: ``masks (N, H, W)`` in {0, 1}, ``fg_on (N,)`` bool (SI fg runs only for episodes whose
        support mask is non-empty; the official code decides this per episode over all shots).
        """
        height, width = masks.shape[-2:]
        device = masks.device
        seed, boxes = self._seed_and_boxes(height, width)
        windows = window_grid(height, width)
        n_windows = windows[0].numel()
        whole = tuple(torch.tensor([v]) for v in (0, height, 0, width))
        # Rectangles: [whole image (global entry), SI windows…, RI boxes…] as (K, 4).
        rects = torch.stack([torch.cat(parts) for parts in zip(whole, windows, boxes, strict=True)], 1).to(
            device
        )
        area = ((rects[:, 1] - rects[:, 0]) * (rects[:, 3] - rects[:, 2])).float()  # (K,)

        mask = masks.double()
        count_fg = _rect_sums(_summed_area_table(mask), rects)  # (N, K), exact integers
        count_bg = area.double() - count_fg
        # Thresholds are float32 comparisons of exact counts, as in the official code.
        c_fg, c_bg = count_fg.float(), count_bg.float()
        n_fg, n_bg = c_fg[:, 0], c_bg[:, 0]  # (N,)
        win = slice(1, 1 + n_windows)
        box = slice(1 + n_windows, None)
        win_fg_limit = torch.clamp(n_fg / FG_WINDOW_DIVISOR, max=WINDOW[0] * WINDOW[1] * FG_WINDOW_RATE)
        win_fg = fg_on.unsqueeze(1) & (c_fg[:, win] >= win_fg_limit.unsqueeze(1))
        win_bg_limit = torch.clamp(n_bg / BG_WINDOW_DIVISOR, max=float(WINDOW[0] * WINDOW[1]))
        win_bg = c_bg[:, win] >= win_bg_limit.unsqueeze(1)
        box_area = area[box]
        box_fg = (
            c_fg[:, box] >= torch.minimum(box_area * BOX_FG_RATE, (n_fg / BOX_DIVISOR).unsqueeze(1))
        ) & (c_fg[:, box] < n_fg.unsqueeze(1))
        box_bg = (c_bg[:, box] >= torch.minimum(box_area, (n_bg / BOX_DIVISOR).unsqueeze(1))) & (
            c_bg[:, box] < n_bg.unsqueeze(1)
        )

        # The SI sub-sample sizes depend on how many windows qualify: the one host synchronisation of DI.
        counts = torch.stack(
            [fg_on.long(), win_fg.sum(1), n_fg.long(), win_bg.sum(1), n_bg.long()], 1
        ).tolist()
        plans = [subsample_plan(bool(f), wf, pf, wb, pb, seed) for f, wf, pf, wb, pb in counts]
        return InterspersionPlan(
            mask=mask,
            rects=rects,
            fg=self._branch_plan(mask, plans, 0, win_fg, box_fg, count_fg, n_windows),
            bg=self._branch_plan(1 - mask, plans, 2, win_bg, box_bg, count_bg, n_windows),
        )

    @staticmethod
    def _branch_plan(
        branch_mask: Tensor,
        plans: list[tuple[str, tuple[int, ...], str, tuple[int, ...]]],
        slot: int,
        win_ok: Tensor,
        box_ok: Tensor,
        count: Tensor,
        n_windows: int,
    ) -> BranchPlan:
        """Entries of one branch's set ``[global, SI…, RI…]``: rectangle, pixel fallback, validity, scale.

        Shape: ``branch_mask (N, H, W)`` float64, ``win_ok (N, nw)``, ``box_ok (N, 100)``, ``count (N, K)``
        → ``BranchPlan`` of ``(N, P)`` tensors.
        """
        n = branch_mask.shape[0]
        device = branch_mask.device
        pixel_sources = [p[slot] == "pixel" for p in plans]
        is_pixel = torch.tensor(pixel_sources, device=device)
        ranks, si_valid = _padded([p[slot + 1] for p in plans], device)
        n_boxes = box_ok.shape[1]
        ones = torch.ones(n, 1, dtype=torch.bool, device=device)
        valid = torch.cat([ones, si_valid, box_ok], 1)  # (N, P)

        # Rectangle index of every entry (window-kind SI entries: the rank-th qualifying window).
        si_rect = 1 + _kth_true(win_ok, ranks) if n_windows else torch.zeros_like(ranks)
        box_rect = torch.arange(1 + n_windows, 1 + n_windows + n_boxes, device=device).expand(n, -1)
        rect_index = torch.cat([torch.zeros_like(ones, dtype=torch.long), si_rect, box_rect], 1)  # (N, P)
        si_pixel = torch.cat(
            [torch.zeros_like(ones), is_pixel.unsqueeze(1) & si_valid, torch.zeros_like(box_ok)], 1
        )  # entries that are single pixel features
        scale = 1 / (count.gather(1, rect_index) + MAP_EPS)
        pixel = None
        if any(pixel_sources):  # known on the host from the plan: sources whose SI fell back to pixels
            pixel = _kth_true(branch_mask.flatten(1) > 0.5, ranks)  # (N, Kmax) row-major pixel index
            scale = torch.where(si_pixel, 1.0, scale)
        scale = torch.where(valid, scale, 0.0)
        return BranchPlan(rect_index=rect_index, si_pixel=si_pixel, pixel=pixel, valid=valid, scale=scale)

    def forward(
        self,
        features: Tensor,
        masks: Tensor | None = None,
        fg_on: Tensor | None = None,
        plan: InterspersionPlan | None = None,
    ) -> PrototypeSets:
        """Build the padded sets from the features and a plan (made from ``masks`` and ``fg_on`` when not
        given; see :meth:`plan`). No host synchronisation once the plan exists.

        Shape: ``features (N, C, h, w)`` (encoder resolution; DI works on their bilinear upsampling to the
        mask size), ``masks (N, H, W)`` in {0, 1}, ``fg_on (N,)`` bool → ``PrototypeSets``.
        """
        if plan is None:
            if masks is None or fg_on is None:
                raise ValueError("DualInterspersion: give either masks and fg_on, or a plan")
            plan = self.plan(masks, fg_on)
        height, width = plan.mask.shape[-2:]
        device = features.device
        u_h = bilinear_weights(height, features.shape[-2], device)
        u_w = bilinear_weights(width, features.shape[-1], device)
        fg, fg_valid = self._branch(features, plan.mask, plan.fg, plan.rects, u_h, u_w)
        bg, bg_valid = self._branch(features, 1 - plan.mask, plan.bg, plan.rects, u_h, u_w)
        return PrototypeSets(fg=fg, fg_valid=fg_valid, bg=bg, bg_valid=bg_valid)

    @staticmethod
    def _branch(
        features: Tensor,
        branch_mask: Tensor,
        entries: BranchPlan,
        rects: Tensor,
        u_h: Tensor,
        u_w: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """One branch's set ``[global, SI…, RI…]`` from its plan.

        Shape: ``features (N, C, h, w)``, ``branch_mask (N, H, W)`` float64, ``rects (K, 4)``,
        ``u_h (H, h)``, ``u_w (W, w)`` → ``(N, P, C)``, ``(N, P)``.
        """
        n, c, h, w = features.shape
        dtype = features.dtype
        device = features.device
        height, width = branch_mask.shape[-2:]
        chosen = rects[entries.rect_index]  # (N, P, 4)

        # Kernel of each rectangle: U_hᵀ (M ∘ 1_rect) U_w, from running column sums of M·U_w (float64).
        col_running = nn.functional.pad(
            (branch_mask.unsqueeze(-1) * u_w).cumsum(2), (0, 0, 1, 0)
        )  # (N,H,W+1,w)
        p = chosen.shape[1]

        def at_column(col: Tensor) -> Tensor:
            return col_running.gather(2, col.view(n, 1, p, 1).expand(-1, height, -1, w))  # (N, H, P, w)

        strip = (at_column(chosen[..., 3]) - at_column(chosen[..., 2])).permute(0, 2, 1, 3).to(dtype)
        rows = torch.arange(height, device=device)
        in_rows = (rows >= chosen[..., 0:1]) & (rows < chosen[..., 1:2])  # (N, P, H)
        row_weights = u_h.to(dtype).t().unsqueeze(0).unsqueeze(0) * in_rows.unsqueeze(2).to(
            dtype
        )  # (N,P,h,H)
        kernel = torch.matmul(row_weights, strip)  # (N, P, h, w)

        if entries.pixel is not None:
            pixel = entries.pixel
            pix_kernel = u_h[pixel // width].unsqueeze(-1) * u_w[pixel % width].unsqueeze(
                -2
            )  # (N, Kmax, h, w)
            n_after = p - 1 - pix_kernel.shape[1]  # RI entries after the SI block
            pix_kernel = nn.functional.pad(pix_kernel, (0, 0, 0, 0, 1, n_after)).to(dtype)
            kernel = torch.where(entries.si_pixel[..., None, None], pix_kernel, kernel)
        protos = torch.matmul(kernel.flatten(2), features.flatten(2).transpose(1, 2))  # (N, P, C)
        return protos * entries.scale.to(dtype).unsqueeze(-1), entries.valid
