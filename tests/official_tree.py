"""The official DIFD module tree, rebuilt for the tests from the specification (sections 4.1, 4.6, 4.7 and the
state-dict paragraph of section 6), so that "an official checkpoint" in the tests is what the official
training really saves: ``model.state_dict()`` of this tree, every parameter and every buffer.

What the official model owns, by attribute name:

* ``encoder``: the torchvision ResNet-101 trunk (layer2/layer3 dilated) as a module dict ``backbone`` of its
  children, with every BatchNorm buffer (running mean and variance, ``num_batches_tracked``), the 1x1
  convolutions ``reduce1`` (1024 -> 512) and ``reduce2`` (2048 -> 512) without bias, and ``reduce1d``
  (Linear 1000 -> 1 with bias);
* ``fuse``: the 1x1 ``Conv2d(2, 1)`` of Interactive Fusion Refinement, without bias;
* ``decoder1`` (foreground) and ``decoder2`` (background): ``merge`` (1x1 conv in -> 512, ReLU, Dropout2d),
  ``res1`` (1x1 conv, ReLU, Dropout2d), ``res2`` (3x3 conv, ReLU, 3x3 conv, ReLU), ``cls`` (3x3 conv, ReLU,
  Dropout2d, 1x1 conv 512 -> 1), all without bias; the released decoders take 2C+3 = 1027 channels;
* ``criterion``: the weighted NLL loss, ``NLLLoss(weight=[0.1, 1.0], ignore_index=255)``, whose class
  weights are a buffer and therefore a key of every official checkpoint (``criterion.weight``).

Nothing here runs a forward pass: only the names, shapes and kinds of the tensors matter.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

#: Feature channels C of the encoder output (method.md §4.1).
C = 512


class OfficialEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        resnet = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[True, True, False])
        self.backbone = nn.ModuleDict(dict(resnet.named_children()))
        self.reduce1 = nn.Conv2d(1024, C, kernel_size=1, bias=False)
        self.reduce2 = nn.Conv2d(2048, C, kernel_size=1, bias=False)
        self.reduce1d = nn.Linear(1000, 1, bias=True)


class OfficialDecoder(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.merge = nn.Sequential(nn.Conv2d(in_channels, C, 1, bias=False), nn.ReLU(), nn.Dropout2d(0.2))
        self.res1 = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.ReLU(), nn.Dropout2d(0.1))
        self.res2 = nn.Sequential(
            nn.Conv2d(C, C, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(C, C, 3, padding=1, bias=False),
            nn.ReLU(),
        )
        self.cls = nn.Sequential(
            nn.Conv2d(C, C, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(C, 1, 1, bias=False),
        )


class OfficialDIFD(nn.Module):
    """The official model's module tree; ``decoder_in`` = 2C+3 (1027) as released, 2C+1 (1025) otherwise."""

    def __init__(self, decoder_in: int = 2 * C + 3, encoder: OfficialEncoder | None = None) -> None:
        super().__init__()
        self.encoder = OfficialEncoder() if encoder is None else encoder
        self.fuse = nn.Conv2d(2, 1, kernel_size=1, bias=False)
        self.decoder1 = OfficialDecoder(decoder_in)
        self.decoder2 = OfficialDecoder(decoder_in)
        self.criterion = nn.NLLLoss(ignore_index=255, weight=torch.FloatTensor([0.1, 1.0]))
