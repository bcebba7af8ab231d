"""A small DIFD for tests: the real head (DI, IFR, FD, decoders) on a conv-stem encoder.

The stem maps ``(N, 3, H, W)`` to ``(N, C, H/4, W/4)`` features (the ResNet-101 encoder's stride) and a
linear threshold per image, so the head's combinatorics run in milliseconds instead of ResNet-101 seconds.
"""

from __future__ import annotations

import torch
from torch import nn

from models import DIFD
from models.decoder import Decoder
from models.dual_interspersion import DualInterspersion
from models.flexible_deployment import FlexibleDeployment
from models.fusion_refinement import InteractiveFusionRefinement


class TinyEncoder(nn.Module):
    """Conv stem to ``(N, C, H/4, W/4)`` features and a linear threshold per image.

    ``batch_norm`` adds a BatchNorm + ReLU after the stem (per-rank statistics matter for DDP tests);
    ``unused_reduce2`` adds a parameter the forward never uses, like the ResNet encoder's ``reduce2``.
    """

    def __init__(self, channels: int, batch_norm: bool = False, unused_reduce2: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, kernel_size=4, stride=4)
        self.bn = nn.BatchNorm2d(channels) if batch_norm else None
        self.head = nn.Linear(channels, 1)
        self.reduce2 = nn.Conv2d(channels, channels, kernel_size=1, bias=False) if unused_reduce2 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.stem(x)
        if self.bn is not None:
            feats = torch.relu(self.bn(feats))
        return feats, self.head(feats.mean((2, 3))).squeeze(1)


def tiny_difd(
    channels: int,
    reduce_dim: int,
    encoder: nn.Module | None = None,
    decoder_extra_maps: bool = False,
    region_sampling: str = "official",
    multi_shot: str = "official",
) -> DIFD:
    """DIFD composed from injected parts: ``encoder`` (default ``TinyEncoder(channels)``) and decoders of
    width ``reduce_dim``; parameters are drawn from the process-wide RNG (seed it first)."""
    encoder = TinyEncoder(channels) if encoder is None else encoder
    in_channels = 2 * channels + (3 if decoder_extra_maps else 1)
    return DIFD(
        encoder=encoder,
        fuse=InteractiveFusionRefinement(),
        deployment=FlexibleDeployment(extra_maps=decoder_extra_maps),
        interspersion=DualInterspersion(region_sampling=region_sampling),
        decoder1=Decoder(in_channels, reduce_dim=reduce_dim),
        decoder2=Decoder(in_channels, reduce_dim=reduce_dim),
        multi_shot=multi_shot,
    )
