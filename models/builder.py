"""DIFD as a method of the harness: the one way to make a DIFD network (:func:`build_difd`), what a DIFD
state dict looks like (:func:`difd_architecture`), and its registration (:data:`DIFD_METHOD`).

``build_difd`` wires the parts together from plain arguments (segment-anything's ``build_sam`` habit), so a
test can inject a small encoder; checkpoints are loaded through :func:`models.load_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from models.decoder import Decoder
from models.difd import DIFD, MULTI_SHOT
from models.dual_interspersion import REGION_SAMPLING, DualInterspersion
from models.encoder import FEATURE_CHANNELS, Res101Encoder
from models.flexible_deployment import FlexibleDeployment
from models.fusion_refinement import InteractiveFusionRefinement
from models.losses import LOSS_WEIGHTS, DIFDLoss
from models.methods import Method, Option, register

#: Keys every DIFD state dict holds (the official module tree, method.md §6).
DIFD_KEYS = (
    "encoder.backbone.conv1.weight",
    "encoder.reduce1.weight",
    "encoder.reduce1d.weight",
    "fuse.weight",
    "decoder1.merge.0.weight",
    "decoder2.merge.0.weight",
)
#: Decoder input channels -> ``decoder_extra_maps`` (2C+1: the paper's, 2C+3: the official decoders').
DECODER_CHANNELS = {2 * FEATURE_CHANNELS + 1: False, 2 * FEATURE_CHANNELS + 3: True}


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


def difd_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The ``decoder_extra_maps`` a DIFD state dict needs, read off its decoder width; ``ValueError`` for
    tensors that are not DIFD's (its keys missing, or a decoder width neither 2C+1 nor 2C+3)."""
    missing = [key for key in DIFD_KEYS if key not in state]
    if missing:
        raise ValueError(f"not a DIFD state dict: it lacks {missing}")
    channels = int(state["decoder1.merge.0.weight"].shape[1])
    if channels not in DECODER_CHANNELS:
        raise ValueError(
            f"decoder1.merge.0.weight takes {channels} input channels; a DIFD decoder takes "
            f"{sorted(DECODER_CHANNELS)} (2C+1 or 2C+3 with C = {FEATURE_CHANNELS})"
        )
    return {"decoder_extra_maps": DECODER_CHANNELS[channels]}


def describe_difd_state(state: Mapping[str, Tensor]) -> str:
    channels = int(state["decoder1.merge.0.weight"].shape[1])
    features = int(state["encoder.reduce1.weight"].shape[0])
    extra = {1: "2C+1", 3: "2C+3"}.get(channels - 2 * features, "unusual")
    return f"a DIFD state dict in the official layout with {extra} ({channels}-channel) decoders"


def _build(options: Mapping[str, Any], pretrained_weights: str | None, pretrained_path: str | None) -> DIFD:
    return build_difd(
        pretrained_weights=pretrained_weights,
        pretrained_path=pretrained_path,
        decoder_extra_maps=options["decoder_extra_maps"],
        region_sampling=options["region_sampling"],
        multi_shot=options["multi_shot"],
    )


DIFD_METHOD = register(
    Method(
        name="difd",
        title="DIFD",
        paper="Cheng et al., Dual Interspersion and Flexible Deployment for Few-Shot Medical Image "
        "Segmentation, IEEE TMI 44(6), 2025",
        build=_build,
        loss=lambda weights, options: DIFDLoss(**weights),
        loss_weights=LOSS_WEIGHTS,
        options={
            "decoder_extra_maps": Option.flag(
                False, "True: 2C+3 decoder input, as the official decoders (loads their 1027-channel weights)"
            ),
            "region_sampling": Option.choice(
                "official", REGION_SAMPLING, "'official': fixed seed-9 RI boxes and SI draws; 'random'"
            ),
            "multi_shot": Option.choice(
                "official", MULTI_SHOT, "'official': shot 0 drives the prediction; 'all': every shot"
            ),
        },
        # What the official train.sh / evaluate.sh pass on top of the official config defaults, plus our
        # validation cadence (20 validations of 2 query volumes x 4 classes: seconds each on a GPU).
        official_script={
            "seed": 2025,
            "lr_step_gamma": 0.9,
            "n_steps": 40000,
            "max_iters_per_load": 10000,
            "save_snapshot_every": 10000,
            "supp_idx": 2,
            "validate_every": 2000,
        },
        architecture_of=difd_architecture,
        describe_state=describe_difd_state,
    )
)
