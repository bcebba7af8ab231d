"""The one way to make a DIFD model (:func:`build_difd`) and to make one from a file (:func:`load_difd`).

``build_difd`` wires the parts together from plain arguments (segment-anything's ``build_sam`` habit), so a
test can inject a small encoder; ``load_difd`` reads a checkpoint once (verified), builds the architecture it
needs and loads its weights strictly, for ``test.py``, ``segment.py`` and the benchmarks.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch import nn

from models.decoder import Decoder
from models.difd import DIFD
from models.dual_interspersion import DualInterspersion
from models.encoder import FEATURE_CHANNELS, Res101Encoder
from models.flexible_deployment import FlexibleDeployment
from models.fusion_refinement import InteractiveFusionRefinement
from models.weights import ModelCheckpoint, decoder_extra_maps_of, load_model_weights, read_model_checkpoint


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
        pretrained_weights: ``None``, ``'deeplabv3'`` or ``'resnet101'`` (method.md §4.1);
            ignored when ``encoder`` is given.
        pretrained_path: local checkpoint file for ``pretrained_weights``.
        decoder_extra_maps: decoders take ``2C+3`` channels (``[F_q, IP, IS, Σ sim', cos(F_q, p)]``, the
            official decoder shape) instead of the paper's ``2C+1`` (method.md §6).
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


def load_difd(
    checkpoint: str | os.PathLike | ModelCheckpoint,
    decoder_extra_maps: bool | None = None,
    region_sampling: str | None = None,
    multi_shot: str | None = None,
) -> tuple[DIFD, ModelCheckpoint]:
    """A DIFD model with the weights of ``checkpoint`` (a path, or a file :func:`read_model_checkpoint`
    already read), and the checkpoint (its kind, step and recorded training config).

    The architecture: ``decoder_extra_maps`` as given (a file that does not fit is an error that says what
    it seems to be and, where the decoder width is the only difference, which value fits), else read off
    the file's decoders (:func:`decoder_extra_maps_of`); ``region_sampling`` and ``multi_shot`` as given,
    else as the checkpoint's config records them, else the official behaviour. The model is on the CPU
    in training mode, as ``build_difd`` leaves it.
    """
    if not isinstance(checkpoint, ModelCheckpoint):
        checkpoint = read_model_checkpoint(checkpoint)
    recorded = checkpoint.config or {}
    if decoder_extra_maps is None:
        decoder_extra_maps = decoder_extra_maps_of(checkpoint)
    with warnings.catch_warnings():
        # The encoder warns that it is randomly initialised: the checkpoint overwrites every weight.
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        model = build_difd(
            pretrained_weights=None,
            decoder_extra_maps=decoder_extra_maps,
            region_sampling=region_sampling or recorded.get("region_sampling", "official"),
            multi_shot=multi_shot or recorded.get("multi_shot", "official"),
        )
    load_model_weights(model, checkpoint)
    return model, checkpoint
