"""Dual Interspersion (DI, spec 4.3): the foreground and background basis-prototype sets of one support image.

Each set is ``[DI global, SI windows…, RI boxes…]``:

- global: masked average of the upsampled support features (``Σ F·M / (n + 1e-5)``);
- Sliding Interspersion (SI): windows of 16×8 pixels, stride 8, kept when they hold enough pixels of the
  branch (fg: ``≥ min(16·8·0.95, n_fg/150)``, only when the episode's support mask is non-empty; bg:
  ``≥ min(16·8, n_bg/250)``), sub-sampled to 150 (fg) / 250 (bg), or replaced by at most 100 single pixel
  features when no window qualifies;
- Random Interspersion (RI): 100 random boxes, fg prototype when ``n1 ≥ min(0.95·area, n_fg/100)`` and
  ``n1 < n_fg``, bg prototype when ``n0 ≥ min(area, n_bg/100)`` and ``n0 < n_bg``.

Vectorised: window and box sums are four-corner look-ups in summed-area tables accumulated in float64 (as
exact as the direct sums), the sets are padded ``(N, P, C)`` tensors with ``(N, P)`` validity masks (invalid
rows are zero). The random choices reproduce the official seed-9 draws with local generators
(``region_sampling='official'``) or draw fresh ones per call (``'random'``); the process-wide RNGs are only
read (never re-seeded), and only in ``'random'`` mode.

Shape: upsampled features ``(N, C, H, W)``, masks ``(N, H, W)`` in {0, 1}, per-source SI-fg flag ``(N,)`` →
``PrototypeSets`` with ``fg (N, Pf, C)``, ``fg_valid (N, Pf)``, ``bg (N, Pb, C)``, ``bg_valid (N, Pb)``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
MAP_EPS = 1e-5
REGION_SAMPLING = ("official", "random")


@dataclass
class PrototypeSets:
    """Padded basis-prototype sets. Shape: ``fg (N, Pf, C)``, ``fg_valid (N, Pf)``, ``bg (N, Pb, C)``,
    ``bg_valid (N, Pb)``; invalid rows are zero."""

    fg: Tensor
    fg_valid: Tensor
    bg: Tensor
    bg_valid: Tensor


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


def _rect_sums(sat: Tensor, rects: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """Sums over rectangles of a zero-padded summed-area table.

    Shape: ``(..., H+1, W+1)`` → ``(..., K)``.
    """
    row0, row1, col0, col1 = rects
    stride = sat.shape[-1]
    flat = sat.flatten(-2)
    return (
        flat[..., row1 * stride + col1]
        - flat[..., row0 * stride + col1]
        - flat[..., row1 * stride + col0]
        + flat[..., row0 * stride + col0]
    )


def _summed_area_table(x: Tensor) -> Tensor:
    """Zero-padded float64 summed-area table. Shape: ``(..., H, W)`` → ``(..., H+1, W+1)``."""
    sat = x.double().cumsum(-2).cumsum(-1)
    return nn.functional.pad(sat, (1, 0, 1, 0))


def _select(ordinals: list[tuple[int, ...]], qualifies: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Pick, per source, the rows of ``values`` whose qualifying rank is listed in ``ordinals``.

    The k-th qualifying row is found on the device by a search in the running count of ``qualifies``, so the
    host only needed the counts.
    Shape: ``qualifies (N, K)``, ``values (N, K, C)`` → ``(N, P, C)``, ``(N, P)``.
    """
    n, _, c = values.shape
    width = max((len(o) for o in ordinals), default=0)
    if width == 0 or values.shape[1] == 0:
        return values.new_zeros(n, 0, c), torch.zeros(n, 0, dtype=torch.bool, device=values.device)
    ranks = torch.zeros(n, width, dtype=torch.long)
    valid = torch.zeros(n, width, dtype=torch.bool)
    for i, o in enumerate(ordinals):  # host-side bookkeeping of the integer plan, no tensor work per source
        ranks[i, : len(o)] = torch.tensor(o, dtype=torch.long)
        valid[i, : len(o)] = True
    ranks = ranks.to(values.device)
    valid = valid.to(values.device)
    running = qualifies.long().cumsum(1)
    index = torch.searchsorted(running, ranks + 1).clamp(max=values.shape[1] - 1)
    picked = values.gather(1, index.unsqueeze(-1).expand(-1, -1, c))
    return torch.where(valid.unsqueeze(-1), picked, 0.0), valid


class DualInterspersion(nn.Module):
    """Dual Interspersion: fg and bg basis-prototype sets of each source image (no parameters).

    Args:
        region_sampling: ``'official'`` (fixed seed-9 draws, spec 4.3) or ``'random'`` (fresh seed per call,
            taken from the process-wide torch RNG so that ``set_seed`` makes runs repeatable).
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

    def forward(self, features: Tensor, masks: Tensor, fg_on: Tensor) -> PrototypeSets:
        """Build the padded sets.

        Shape: ``features (N, C, H, W)`` (upsampled to the image size), ``masks (N, H, W)`` in {0, 1},
        ``fg_on (N,)`` bool (SI fg runs only for episodes whose support mask is non-empty; the official code
        decides this per episode over all shots) → ``PrototypeSets``.
        """
        n, c, height, width = features.shape
        device, dtype = features.device, features.dtype
        seed, boxes = self._seed_and_boxes(height, width)
        windows = window_grid(height, width)
        rects = tuple(torch.cat([w, b]).to(device) for w, b in zip(windows, boxes, strict=True))
        n_windows = windows[0].numel()
        area = ((rects[1] - rects[0]) * (rects[3] - rects[2])).float()  # (K,)

        mask = masks.to(dtype)
        sat_fg = _summed_area_table(features * mask.unsqueeze(1))  # (N, C, H+1, W+1) float64
        sat_all = _summed_area_table(features)
        sat_mask = _summed_area_table(mask)  # (N, H+1, W+1)
        sum_fg = _rect_sums(sat_fg, rects)  # (N, C, K)
        sum_bg = _rect_sums(sat_all, rects) - sum_fg
        count_fg = _rect_sums(sat_mask, rects)  # (N, K), exact integers
        count_bg = area.double() - count_fg
        proto_fg = (sum_fg / (count_fg.unsqueeze(1) + MAP_EPS)).to(dtype).transpose(1, 2)  # (N, K, C)
        proto_bg = (sum_bg / (count_bg.unsqueeze(1) + MAP_EPS)).to(dtype).transpose(1, 2)

        # Global entries: Σ F·M / (n + 1e-5) with n_bg = H·W - n_fg.
        total_fg = sat_fg[..., -1, -1]
        total_bg = sat_all[..., -1, -1] - total_fg
        # Thresholds are float32 comparisons of exact counts, as in the official code.
        n_fg = sat_mask[:, -1, -1].float()  # (N,)
        n_bg = height * width - n_fg
        global_fg = (total_fg / (n_fg.double().unsqueeze(1) + MAP_EPS)).to(dtype)
        global_bg = (total_bg / (n_bg.double().unsqueeze(1) + MAP_EPS)).to(dtype)

        c_fg, c_bg = count_fg.float(), count_bg.float()
        win_fg = fg_on.unsqueeze(1) & (
            c_fg[:, :n_windows]
            >= torch.clamp(n_fg / FG_WINDOW_DIVISOR, max=WINDOW[0] * WINDOW[1] * FG_WINDOW_RATE).unsqueeze(1)
        )
        win_bg = c_bg[:, :n_windows] >= torch.clamp(
            n_bg / BG_WINDOW_DIVISOR, max=float(WINDOW[0] * WINDOW[1])
        ).unsqueeze(1)
        box_area = area[n_windows:]
        box_fg = (
            c_fg[:, n_windows:] >= torch.minimum(box_area * BOX_FG_RATE, (n_fg / BOX_DIVISOR).unsqueeze(1))
        ) & (c_fg[:, n_windows:] < n_fg.unsqueeze(1))
        box_bg = (c_bg[:, n_windows:] >= torch.minimum(box_area, (n_bg / BOX_DIVISOR).unsqueeze(1))) & (
            c_bg[:, n_windows:] < n_bg.unsqueeze(1)
        )

        # The SI sub-sample sizes depend on how many windows qualify: the one host synchronisation of DI.
        counts = torch.stack(
            [fg_on.long(), win_fg.sum(1), n_fg.long(), win_bg.sum(1), n_bg.long()], 1
        ).tolist()
        plans = [subsample_plan(bool(f), wf, pf, wb, pb, seed) for f, wf, pf, wb, pb in counts]

        pixels_fg = mask.flatten(1) > 0.5  # (N, H·W)
        si_fg, si_fg_valid = self._si(plans, 0, win_fg, proto_fg[:, :n_windows], pixels_fg, features)
        si_bg, si_bg_valid = self._si(plans, 2, win_bg, proto_bg[:, :n_windows], ~pixels_fg, features)

        ones = torch.ones(n, 1, dtype=torch.bool, device=device)
        fg = torch.cat(
            [global_fg.unsqueeze(1), si_fg, torch.where(box_fg.unsqueeze(-1), proto_fg[:, n_windows:], 0.0)],
            1,
        )
        bg = torch.cat(
            [global_bg.unsqueeze(1), si_bg, torch.where(box_bg.unsqueeze(-1), proto_bg[:, n_windows:], 0.0)],
            1,
        )
        return PrototypeSets(
            fg=fg,
            fg_valid=torch.cat([ones, si_fg_valid, box_fg], 1),
            bg=bg,
            bg_valid=torch.cat([ones, si_bg_valid, box_bg], 1),
        )

    @staticmethod
    def _si(
        plans: list[tuple[str, tuple[int, ...], str, tuple[int, ...]]],
        slot: int,
        window_ok: Tensor,
        window_protos: Tensor,
        pixel_ok: Tensor,
        features: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """SI entries of one branch: chosen windows, or chosen pixel features where no window qualified.

        Shape: ``window_ok (N, nw)``, ``window_protos (N, nw, C)``, ``pixel_ok (N, H·W)``,
        ``features (N, C, H, W)``
        → ``(N, P, C)``, ``(N, P)``.
        """
        is_pixel = [p[slot] == "pixel" for p in plans]
        win_ord = [() if px else p[slot + 1] for p, px in zip(plans, is_pixel, strict=True)]
        protos, valid = _select(win_ord, window_ok, window_protos)
        if any(is_pixel):
            px_ord = [p[slot + 1] if px else () for p, px in zip(plans, is_pixel, strict=True)]
            px_protos, px_valid = _select(px_ord, pixel_ok, features.flatten(2).transpose(1, 2))
            # Each source is either window-kind or pixel-kind: the other selection is empty (zero, invalid).
            width = max(protos.shape[1], px_protos.shape[1])
            protos = nn.functional.pad(protos, (0, 0, 0, width - protos.shape[1])) + nn.functional.pad(
                px_protos, (0, 0, 0, width - px_protos.shape[1])
            )
            valid = nn.functional.pad(valid, (0, width - valid.shape[1])) | nn.functional.pad(
                px_valid, (0, width - px_valid.shape[1])
            )
        return protos, valid
