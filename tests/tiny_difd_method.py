"""``tiny_difd``: DIFD's real head and loss on the conv-stem encoder of :mod:`tests.tiny_difd`, registered as
a method (``plugins=[<this file>] method=tiny_difd``), so that run-level tests train, kill and resume the
real training loop in a fraction of a second per step instead of ResNet-101 seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models import DIFD, DIFD_METHOD, DIFDLoss, Method, Option, register
from tests.tiny_difd import tiny_difd

NAME = "tiny_difd"


def build(options: Mapping[str, Any], pretrained_weights: str | None, pretrained_path: str | None) -> DIFD:
    model = tiny_difd(options["channels"], options["channels"], region_sampling=options["region_sampling"])
    model.method = NAME  # its snapshots name this method, not DIFD
    return model


register(
    Method(
        name=NAME,
        title="tiny DIFD",
        paper="a test of the run-level faults",
        build=build,
        loss=lambda weights, options: DIFDLoss(**weights),
        loss_weights=DIFD_METHOD.loss_weights,
        options={
            "channels": Option.integer(8, 1, "feature channels of the stem and the decoders"),
            "region_sampling": DIFD_METHOD.options["region_sampling"],
        },
        architecture_of=lambda state: {"channels": int(state["encoder.stem.weight"].shape[0])},
    )
)
