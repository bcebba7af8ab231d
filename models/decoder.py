"""Decoder of DIFD (method.md §4.6): the deployed features ``[F_q, IP, IS(, extra)]`` → one logit map.

Two instances with identical architecture exist, ``decoder1`` for the foreground branch and ``decoder2`` for
the background branch (official module tree). Submodule indices match the official checkpoint names
``merge.0``, ``res1.0``, ``res2.0``, ``res2.2``, ``cls.0``, ``cls.3``.

Shape: ``(N, 2C+1, h, w)`` (``2C+3`` with ``decoder_extra_maps``) → ``(N, 1, h, w)``.
"""

from __future__ import annotations

from torch import Tensor, nn

REDUCE_DIM = 512


class Decoder(nn.Module):
    """merge (1×1, ReLU, Dropout2d 0.2) → res1 (1×1, ReLU, Dropout2d 0.1) → res2 (two 3×3 with ReLU) added to
    its input → cls (3×3, ReLU, Dropout2d 0.1, 1×1 → 1 channel). No biases."""

    def __init__(self, in_channels: int, reduce_dim: int = REDUCE_DIM) -> None:
        super().__init__()
        self.merge = nn.Sequential(
            nn.Conv2d(in_channels, reduce_dim, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.2),
        )
        self.res1 = nn.Sequential(
            nn.Conv2d(reduce_dim, reduce_dim, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.1),
        )
        self.res2 = nn.Sequential(
            nn.Conv2d(reduce_dim, reduce_dim, kernel_size=3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(reduce_dim, reduce_dim, kernel_size=3, padding=1, bias=False),
            nn.ReLU(inplace=True),
        )
        self.cls = nn.Sequential(
            nn.Conv2d(reduce_dim, reduce_dim, kernel_size=3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.1),
            nn.Conv2d(reduce_dim, 1, kernel_size=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Shape: ``(N, in_channels, h, w)`` → ``(N, 1, h, w)``."""
        x = self.res1(self.merge(x))
        x = self.res2(x) + x
        return self.cls(x)
