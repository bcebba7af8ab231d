"""``build_difd``: assemble DIFD from plain arguments (the only place that wires the parts together)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from models.decoder import Decoder
from models.difd import DIFD
from models.dual_interspersion import DualInterspersion
from models.encoder import FEATURE_CHANNELS, Res101Encoder
from models.flexible_deployment import FlexibleDeployment
from models.fusion_refinement import InteractiveFusionRefinement


def build_difd(
    pretrained_weights: str | None = None,
    pretrained_path: str | Path | None = None,
    decoder_extra_maps: bool = False,
    region_sampling: str = "official",
    multi_shot: str = "official",
    encoder: nn.Module | None = None,
) -> DIFD:
    """Build the DIFD model.

    Args:
        pretrained_weights: ``None``, ``'deeplabv3'`` or ``'resnet101'`` (spec 4.1);
            ignored when ``encoder`` is given.
        pretrained_path: local checkpoint file for ``pretrained_weights``.
        decoder_extra_maps: decoders take ``2C+3`` channels (``[F_q, IP, IS, Σ sim', cos(F_q, p)]``, the
            official decoder shape) instead of the paper's ``2C+1`` (spec section 6).
        region_sampling: ``'official'`` (fixed seed-9 RI boxes and SI sub-samples) or ``'random'``.
        multi_shot: ``'official'`` (shot 0 feeds DI and φ) or ``'all'``.
        encoder: a ready encoder mapping ``(N, 3, H, W)`` to ``((N, 512, h, w), (N,))`` (tests inject a small
            one); ``None`` builds the ResNet-101 encoder.
    """
    if encoder is None:
        encoder = Res101Encoder(pretrained_weights=pretrained_weights, pretrained_path=pretrained_path)
    in_channels = 2 * FEATURE_CHANNELS + (3 if decoder_extra_maps else 1)
    return DIFD(
        encoder=encoder,
        fuse=InteractiveFusionRefinement(),
        deployment=FlexibleDeployment(extra_maps=decoder_extra_maps),
        interspersion=DualInterspersion(region_sampling=region_sampling),
        decoder1=Decoder(in_channels),
        decoder2=Decoder(in_channels),
        multi_shot=multi_shot,
    )
