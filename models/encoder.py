"""ResNet-101 encoder of DIFD (method.md §4.1): query/support features and the per-image threshold ``t``.

Shape: images ``(N, 3, H, W)`` → features ``F = reduce1(layer3(x))`` ``(N, 512, h, w)`` with ``h = H/4``
(layer2 and layer3 dilated), and ``t = reduce1d(fc(avgpool(layer4(x))))`` ``(N,)``. With
``layer4_features=True`` (Q-Net, GMRD) it also returns ``reduce2(layer4(x))`` ``(N, 512, h/2, w/2)``.

Parameter names follow the official module tree (``backbone.{conv1,bn1,layer1..layer4,fc}``, ``reduce1``,
``reduce2``, ``reduce1d``) so official checkpoints load unchanged. ``reduce2`` (2048 → 512 on layer4) is
computed and discarded by DIFD's official code: the parameter is kept for checkpoint compatibility, the
compute is skipped unless ``layer4_features``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from models.files import load_torch_file

logger = logging.getLogger(__name__)

FEATURE_CHANNELS = 512


@dataclass(frozen=True)
class PretrainedFile:
    """One of torchvision's checkpoints for the encoder: its file name (the part after the last ``-`` is the
    start of its SHA-256), download address and the prefix its trunk keys carry."""

    file_name: str
    url: str
    prefix: str

    @property
    def sha256_prefix(self) -> str:
        """The hex digits after the file name's last ``-``: the start of the file's SHA-256 (torch.hub's
        rule, ``deeplabv3_resnet101_coco-586e9e4e.pth`` → ``586e9e4e``)."""
        return self.file_name.rsplit("-", 1)[1].split(".", 1)[0]


#: The ``pretrained_weights`` kinds (method.md §4.1).
PRETRAINED = {
    "deeplabv3": PretrainedFile(
        "deeplabv3_resnet101_coco-586e9e4e.pth",
        "https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth",
        "backbone.",
    ),
    "resnet101": PretrainedFile(
        "resnet101-63fe2227.pth", "https://download.pytorch.org/models/resnet101-63fe2227.pth", ""
    ),
}


@dataclass
class PretrainedReport:
    """What a pretrained checkpoint contributed: tensors loaded, and the encoder tensors left random."""

    kind: str
    path: str
    loaded: int
    total: int
    random: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


class Res101Encoder(nn.Module):
    """ResNet-101 trunk with dilated layer2/layer3, ``reduce1`` features and the threshold head.

    Args:
        pretrained_weights: ``None`` (random initialisation, with a warning), ``'deeplabv3'`` (COCO DeepLabV3
            checkpoint, ``backbone.``-prefixed keys) or ``'resnet101'`` (ImageNet checkpoint, unprefixed
            keys).
        pretrained_path: local checkpoint file for the chosen kind (required unless ``pretrained_weights`` is
            ``None``).
        layer4_features: also return the layer-4 features ``reduce2(layer4(x))``.

    Shape:
        forward: ``(N, 3, H, W)`` → ``((N, 512, h, w), (N,))``; with ``layer4_features``
        ``((N, 512, h, w), (N, 512, h/2, w/2), (N,))``.
    """

    def __init__(
        self,
        pretrained_weights: str | None = None,
        pretrained_path: str | Path | None = None,
        layer4_features: bool = False,
    ) -> None:
        super().__init__()
        self.layer4_features = layer4_features
        trunk = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[True, True, False])
        self.backbone = nn.ModuleDict(dict(trunk.named_children()))
        self.reduce1 = nn.Conv2d(1024, FEATURE_CHANNELS, kernel_size=1, bias=False)
        self.reduce2 = nn.Conv2d(2048, FEATURE_CHANNELS, kernel_size=1, bias=False)
        self.reduce1d = nn.Linear(1000, 1, bias=True)
        self._init_weights()
        self.pretrained_report = self._load_pretrained(pretrained_weights, pretrained_path)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _load_pretrained(self, kind: str | None, path: str | Path | None) -> PretrainedReport | None:
        if kind is None:
            warnings.warn(
                "Res101Encoder: no pretrained weights requested; the encoder is randomly initialised",
                stacklevel=3,
            )
            return None
        if kind not in PRETRAINED:
            raise ValueError(f"pretrained_weights: expected None, 'deeplabv3' or 'resnet101', got {kind!r}")
        if path is None:
            raise ValueError(
                f"pretrained_weights={kind!r} needs pretrained_path (a local checkpoint file), got None"
            )
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained checkpoint for {kind!r} not found: {path}")
        checkpoint = load_torch_file(path, f"pretrained checkpoint ({kind!r})")
        if not isinstance(checkpoint, Mapping):
            raise ValueError(
                f"pretrained checkpoint {path}: expected a state dict, found {type(checkpoint).__name__}"
            )
        prefix = PRETRAINED[kind].prefix
        own = self.state_dict()
        updated: dict[str, Tensor] = {}
        ignored = []
        for key, value in checkpoint.items():
            if not key.startswith(prefix):
                ignored.append(key)
                continue
            target = "backbone." + key[len(prefix) :]
            if target not in own:
                ignored.append(key)
                continue
            if own[target].shape != value.shape:
                raise ValueError(
                    f"pretrained checkpoint {path}: {key} has shape {tuple(value.shape)}, "
                    f"the encoder expects {tuple(own[target].shape)}"
                )
            updated[target] = value
        if not updated:
            raise ValueError(
                f"pretrained checkpoint {path}: no tensor matches the ResNet-101 encoder for kind {kind!r} "
                f"(expected keys like '{prefix}conv1.weight')"
            )
        self.load_state_dict(updated, strict=False)
        report = PretrainedReport(
            kind=kind,
            path=str(path),
            loaded=len(updated),
            total=len(own),
            random=sorted(k for k in own if k not in updated),
            ignored=ignored,
        )
        logger.info(
            "Res101Encoder: loaded %d of %d tensors from %s (%s); %d stayed random: %s",
            report.loaded,
            report.total,
            path,
            kind,
            len(report.random),
            ", ".join(report.random),
        )
        return report

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Encode a batch of images. Shape: ``(N, 3, H, W)`` → ``((N, 512, h, w), (N,))``, with
        ``layer4_features`` ``((N, 512, h, w), (N, 512, h/2, w/2), (N,))``."""
        b = self.backbone
        x = b["maxpool"](b["relu"](b["bn1"](b["conv1"](x))))
        x = b["layer3"](b["layer2"](b["layer1"](x)))
        features = self.reduce1(x)
        x = b["layer4"](x)
        t = self.reduce1d(b["fc"](torch.flatten(b["avgpool"](x), 1))).squeeze(1)
        if self.layer4_features:
            return features, self.reduce2(x), t
        return features, t


#: ``DeepLabRes101Encoder`` feature channels (its 1×1 ``localconv`` on layer4).
DEEPLAB_FEATURE_CHANNELS = 256


class DeepLabRes101Encoder(nn.Module):
    """The trunk of torchvision's DeepLabV3-ResNet101 (layer3 and layer4 dilated, output stride 8) and a 1×1
    reduction of layer4: SSL-ALPNet's and ADNet's encoder (docs/methods.md, ADNet).

    Parameter names follow the official module tree (``backbone.{conv1,bn1,layer1..layer4}``, ``localconv``,
    ``asppconv``, ``aspp_out``). The official encoder also builds DeepLabV3's ASPP head (``aspp_out``) and a
    1×1 ``asppconv`` that its forward never uses: they are kept so that official checkpoints load
    (:attr:`unused_parameters`), never computed. Initialisation is torchvision's (as the official code);
    ``pretrained_weights`` as for :class:`Res101Encoder` (only the trunk is loaded).

    Shape: ``(N, 3, H, W)`` → ``(N, 256, ⌈H/8⌉, ⌈W/8⌉)``.
    """

    def __init__(
        self, pretrained_weights: str | None = None, pretrained_path: str | Path | None = None
    ) -> None:
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP

        trunk = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        children = dict(trunk.named_children())
        self.backbone = nn.ModuleDict({k: v for k, v in children.items() if k not in ("avgpool", "fc")})
        self.localconv = nn.Conv2d(2048, DEEPLAB_FEATURE_CHANNELS, kernel_size=1, bias=False)
        self.asppconv = nn.Conv2d(256, 256, kernel_size=1, bias=False)
        self.aspp_out = nn.Sequential(
            ASPP(2048, [12, 24, 36]), nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False)
        )
        self.unused_parameters = tuple(
            name for name, _ in self.named_parameters() if name.startswith(("asppconv.", "aspp_out."))
        )
        self.pretrained_report = self._load_pretrained(pretrained_weights, pretrained_path)

    _load_pretrained = Res101Encoder._load_pretrained

    def forward(self, x: Tensor) -> Tensor:
        """Encode a batch of images. Shape: ``(N, 3, H, W)`` → ``(N, 256, h, w)``."""
        b = self.backbone
        x = b["maxpool"](b["relu"](b["bn1"](b["conv1"](x))))
        x = b["layer4"](b["layer3"](b["layer2"](b["layer1"](x))))
        return self.localconv(x)


def encode_episode(encoder: nn.Module, supp_imgs: Tensor, qry_imgs: Tensor) -> tuple[Tensor, Tensor]:
    """Supports and queries through ``encoder`` in one batch (BatchNorm statistics of both in training, as
    the official codes do). Shape: ``(B, S, 3, H, W)``, ``(B, Q, 3, H, W)`` -> ``(B, S, C, h, w)``,
    ``(B, Q, C, h, w)``."""
    b, s = supp_imgs.shape[:2]
    feats = encoder(torch.cat([supp_imgs.flatten(0, 1), qry_imgs.flatten(0, 1)]))
    return feats[: b * s].unflatten(0, (b, s)), feats[b * s :].unflatten(0, (b, qry_imgs.shape[1]))
