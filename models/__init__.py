"""The DIFD network, one module per step of the method (method.md §4), its losses, and its weights in files.

``build_difd`` builds the network from plain arguments, ``load_difd`` builds it from a checkpoint and loads
it; ``DIFDLoss`` holds the training losses. Nothing here imports from outside this package.
"""

from models.builder import build_difd, load_difd
from models.difd import DIFD, DIFDOutput, EncodedSupport
from models.losses import DIFDLoss
from models.weights import ModelCheckpoint, load_model_weights, read_model_checkpoint

__all__ = [
    "DIFD",
    "DIFDLoss",
    "DIFDOutput",
    "EncodedSupport",
    "ModelCheckpoint",
    "build_difd",
    "load_difd",
    "load_model_weights",
    "read_model_checkpoint",
]
