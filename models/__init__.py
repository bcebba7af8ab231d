"""The networks of the methods, one module per step of each method (method.md §4 for DIFD), their losses,
the method plug-in interface and registry (:mod:`models.methods`), and model weights in files.

``build_difd`` builds DIFD from plain arguments; :func:`load_model` builds any registered method's network
from a checkpoint and loads it; ``get_method(name)`` gives what the harness needs of a method. Importing
this package registers the built-in methods. Nothing here imports from outside this package.
"""

from models.builder import DIFD_METHOD, build_difd
from models.difd import DIFD, DIFDOutput, EncodedSupport
from models.gmrd_builder import GMRD_METHOD  # noqa: F401  (registers method=gmrd)
from models.loading import checkpoint_method, load_model
from models.losses import DIFDLoss
from models.methods import (
    DEFAULT_METHOD,
    FewShotOutput,
    Method,
    Option,
    get_method,
    load_plugins,
    method_names,
    register,
)
from models.qnet import QNET_METHOD as QNET_METHOD  # registers method=qnet
from models.weights import ModelCheckpoint, identify_methods, load_model_weights, read_model_checkpoint

__all__ = [
    "DEFAULT_METHOD",
    "DIFD",
    "DIFD_METHOD",
    "DIFDLoss",
    "DIFDOutput",
    "EncodedSupport",
    "FewShotOutput",
    "Method",
    "ModelCheckpoint",
    "Option",
    "build_difd",
    "checkpoint_method",
    "get_method",
    "identify_methods",
    "load_model",
    "load_model_weights",
    "load_plugins",
    "method_names",
    "read_model_checkpoint",
    "register",
]

# The baselines register after DIFD, the default method, which is listed first.
import models.adnet  # noqa: E402, F401
import models.ssl_alpnet  # noqa: E402, F401
