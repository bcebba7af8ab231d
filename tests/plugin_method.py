"""A method of one's own, outside ``models/``: how a researcher plugs a method into the harness.

``tiny_proto`` is a prototype network in a few lines: a conv stem to ``(N, C, H/4, W/4)`` features, the
masked average of the support features as the foreground prototype, a cosine map scaled by a learnt factor
(``scaler``, an option of the method) through a sigmoid. Its loss has one term, the NLL of the queries.
``tests/test_methods.py`` trains, snapshots, resumes and evaluates it through ``train.py`` and ``test.py``
with ``plugins=[<this file>]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models import FewShotOutput, Method, Option, register

NAME = "tiny_proto"


@dataclass
class ProtoSupport:
    """A support encoded once: ``prototype (B, C)``."""

    prototype: Tensor

    def episode(self, index: int) -> ProtoSupport:
        return ProtoSupport(self.prototype[index : index + 1])


class TinyProto(nn.Module):
    method = NAME
    unused_parameters = ()
    official_extras = {}

    def __init__(self, channels: int, scaler: float) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, kernel_size=4, stride=4)
        self.scale = nn.Parameter(torch.tensor(float(scaler)))

    def encode_queries(self, imgs: Tensor) -> tuple[Tensor]:
        return (self.stem(imgs),)

    def encode_support(self, supp_imgs: Tensor, supp_masks: Tensor) -> ProtoSupport:
        b, s = supp_imgs.shape[:2]
        feats = self.stem(supp_imgs.flatten(0, 1))
        masks = F.interpolate(supp_masks.flatten(0, 1)[:, None].to(feats.dtype), size=feats.shape[-2:])
        proto = (feats * masks).sum((2, 3)) / (masks.sum((2, 3)) + 1e-5)
        return ProtoSupport(proto.view(b, s, -1).mean(1))

    def segment_encoded(
        self, support: ProtoSupport, query_feats: Tensor, size: tuple[int, int] | None = None
    ):
        b, q = query_feats.shape[:2]
        cos = F.cosine_similarity(
            query_feats.flatten(0, 1), support.prototype.repeat_interleave(q, 0)[..., None, None], dim=1
        )
        fg = torch.sigmoid(self.scale * cos)[:, None]
        fg = F.interpolate(fg, scale_factor=4, mode="bilinear", align_corners=False)
        return torch.cat([1 - fg, fg], 1).unflatten(0, (b, q))

    def forward(self, supp_imgs: Tensor, supp_masks: Tensor, qry_imgs: Tensor) -> FewShotOutput:
        support = self.encode_support(supp_imgs, supp_masks)
        (feats,) = self.encode_queries(qry_imgs.flatten(0, 1))
        return FewShotOutput(self.segment_encoded(support, feats.unflatten(0, qry_imgs.shape[:2])))


class TinyLoss(nn.Module):
    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        self.weight = float(weights["query_nll"])

    def forward(self, out: FewShotOutput, qry_labels: Tensor, supp_masks: Tensor) -> dict[str, Tensor]:
        log_p = torch.log(out.query_probs.flatten(0, 1).clamp(1e-6, 1 - 1e-6))
        nll = F.nll_loss(log_p, qry_labels.flatten(0, 1).long(), ignore_index=255)
        return {"query_nll": nll, "total": self.weight * nll}


def build(
    options: Mapping[str, Any], pretrained_weights: str | None, pretrained_path: str | None
) -> TinyProto:
    return TinyProto(options["channels"], options["scaler"])


register(
    Method(
        name=NAME,
        title="TinyProto",
        paper="a test of the plug-in interface",
        build=build,
        loss=lambda weights, options: TinyLoss(weights),
        loss_weights={"query_nll": 1.0},
        options={
            "channels": Option.integer(8, 1, "feature channels of the stem"),
            "scaler": Option.number(5.0, 0.0, "initial scale of the cosine map"),
        },
        official_script={"n_steps": 6, "seed": 7},
        architecture_of=lambda state: {"channels": int(state["stem.weight"].shape[0])},
    )
)
