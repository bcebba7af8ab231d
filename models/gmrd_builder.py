"""GMRD as a method of the harness: the one way to make a GMRD network (:func:`build_gmrd`), what a GMRD
state dict looks like (:func:`gmrd_architecture`), and its registration (:data:`GMRD_METHOD`).

The official ``FewShotSeg`` module tree is ours (``encoder.*``, ``mlp1/mlp2.reduce.{0,2}``,
``decoder1/decoder2.{res1.0,res2.0,res2.2,down.0,down.3}``): its state dicts load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from models.encoder import Res101Encoder
from models.gmrd import (
    BG_DESCRIPTORS,
    EDGE_MASKS,
    FG_DESCRIPTORS,
    GMRD,
    DescriptorDecoder,
    DescriptorGenerator,
    GMRDLoss,
)
from models.methods import Method, Option, register

#: Slice side of CHAOST2 and CMR (``mlp_size`` when ``image_size`` is None; SABS's 257 px slices need
#: ``image_size=256``).
NATIVE_SIZE = 256


def build_gmrd(
    pretrained_weights: str | None = None,
    pretrained_path: str | Path | None = None,
    mlp_size: int = 256,
    edge_masks: str = "official",
    encoder: nn.Module | None = None,
    fg_descriptors: int = FG_DESCRIPTORS,
    bg_descriptors: int = BG_DESCRIPTORS,
) -> GMRD:
    """Build GMRD: the shared ResNet-101 encoder (or an injected one: tests pass a small one), descriptor
    layers for ``mlp_size x mlp_size`` slices and the official decoders; ``pretrained_*`` as for DIFD."""
    if encoder is None:
        encoder = Res101Encoder(pretrained_weights=pretrained_weights, pretrained_path=pretrained_path)
    return GMRD(
        encoder=encoder,
        mlp1=DescriptorGenerator(mlp_size, fg_descriptors),
        mlp2=DescriptorGenerator(mlp_size, bg_descriptors),
        decoder1=DescriptorDecoder(fg_descriptors),
        decoder2=DescriptorDecoder(bg_descriptors),
        edge_masks=edge_masks,
    )


def gmrd_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The ``mlp_size`` a GMRD state dict needs (its descriptor layers' input width is ``mlp_size²``);
    ``ValueError`` for tensors that are not GMRD's."""
    missing = [key for key in GMRD_KEYS if key not in state]
    if missing:
        raise ValueError(f"not a GMRD state dict: it lacks {missing}")
    pixels = int(state["mlp1.reduce.0.weight"].shape[1])
    size = math.isqrt(pixels)
    if size * size != pixels:
        raise ValueError(f"mlp1.reduce.0.weight takes {pixels} inputs, not the pixels of a square slice")
    return {"mlp_size": size}


#: Keys every GMRD state dict holds (the official module tree).
GMRD_KEYS = (
    "encoder.backbone.conv1.weight",
    "encoder.reduce1d.weight",
    "mlp1.reduce.0.weight",
    "mlp2.reduce.2.weight",
    "decoder1.res1.0.weight",
    "decoder2.down.3.weight",
)


def _slice_size(config: Mapping[str, Any]) -> int:
    return config.get("image_size") or NATIVE_SIZE


GMRD_METHOD = register(
    Method(
        name="gmrd",
        title="GMRD",
        paper="Cheng et al., Few-shot medical image segmentation via generating multiple representative "
        "descriptors, IEEE TMI 43(6), 2024",
        build=lambda options, weights, path: build_gmrd(
            weights, path, mlp_size=options["mlp_size"], edge_masks=options["edge_masks"]
        ),
        loss=lambda weights, options: GMRDLoss(**weights),
        loss_weights={"query_nll": 1.0, "align_nll": 1.0},
        options={
            "mlp_size": Option.integer(
                NATIVE_SIZE,
                1,
                "side of the square slices the descriptor layers take (default: image_size, else 256)",
                follows=_slice_size,
            ),
            "edge_masks": Option.choice(
                "official", EDGE_MASKS, "'official': background edge dilate(1-M)-M; 'paper': dilate(M)-M"
            ),
        },
        # What the official scripts/train.sh and evaluate.sh pass, plus our validation cadence.
        official_script={
            "seed": 2025,
            "lr_step_gamma": 0.98,
            "n_steps": 36000,
            "max_iters_per_load": 3000,
            "save_snapshot_every": 6000,
            "supp_idx": 2,
            "n_part": 3,
            "validate_every": 2000,
        },
        architecture_of=gmrd_architecture,
    )
)
