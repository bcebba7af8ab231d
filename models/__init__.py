"""DIFD model package: ``build_difd`` builds the network, ``DIFDLoss`` holds the training losses."""

from models.builder import build_difd
from models.difd import DIFD, DIFDOutput, EncodedSupport
from models.losses import DIFDLoss

__all__ = ["DIFD", "DIFDLoss", "DIFDOutput", "EncodedSupport", "build_difd"]
