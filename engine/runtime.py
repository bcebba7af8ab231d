"""Speed and scale-out switches shared by ``train.py``, ``test.py`` and the benchmarks (torch only).

Every switch defaults to the faithful numerics:

* ``precision``: ``'fp32'`` (default) or ``'bf16'``, a bfloat16 autocast of the model's forward on the
  inputs' device type (CUDA, or CPU where bf16 autocast also works); the losses stay in float32.
* ``channels_last``: NHWC memory format for the model's convolution weights (the activations follow), the
  layout tensor cores prefer; same maths, other kernels.
* ``sgd_impl``: ``None`` (torch's default SGD kernels), ``'foreach'`` (multi-tensor kernels) or ``'fused'``
  (one fused kernel; falls back to ``'foreach'``, with a warning, where this torch build lacks it).

Scale-out (``torchrun --nproc_per_node=K train.py with ...``): :func:`init_distributed` reads torchrun's
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and starts the process group (NCCL on CUDA, gloo on CPU);
:func:`wrap_distributed` wraps the model in ``DistributedDataParallel``; :func:`episode_indices` gives each
rank a disjoint slice of every step's episodes, so K ranks at ``batch_size`` b draw the same episodes as
one process at K·b, each rank computes its b episodes exactly as a single process would, and DDP averages
the K gradients.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from utils import set_seed

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
SGD_IMPLS = (None, "foreach", "fused")


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`, else raise ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), where ``precision='bf16'`` makes a
    training step faster (docs/speed.md); elsewhere bf16 is emulated and slower than fp32.

    The probes are private torch functions; a torch without them answers ``False`` (use fp32).
    """
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    probes = [getattr(torch.cpu, name, None) for name in names]
    return any(probe is not None and probe() for probe in probes)


def cpu_precision() -> str:
    """The precision of the CPU runs of ``script/demo.sh`` and ``script/learning_check.sh``: ``'bf16'`` where
    the CPU has bfloat16 instructions (:func:`cpu_has_native_bf16`), ``'fp32'`` elsewhere."""
    return "bf16" if cpu_has_native_bf16() else "fp32"


#: The cost of emulated bf16, measured (issue 25): a 64 px ResNet-101 training step on a 2-core AMD EPYC with
#: AVX2 and no bfloat16 instructions, torch 2.14.1.
EMULATED_BF16_COST = "a 64 px training step took 44 s in bf16 against 1.3 s in fp32 (34x slower)"


def emulated_bf16_warning(precision: str, device: torch.device) -> str | None:
    """The start-up warning of ``precision='bf16'`` on a CPU without bfloat16 instructions, where torch
    emulates it (:func:`cpu_has_native_bf16`), with the measured cost and the faster choice; else None."""
    if precision != "bf16" or device.type != "cpu" or cpu_has_native_bf16():
        return None
    return (
        "precision='bf16' on a CPU without bfloat16 instructions (AVX512-BF16 or AMX): torch emulates it, "
        f"much slower than fp32 ({EMULATED_BF16_COST} on a 2-core AVX2 AMD EPYC, docs/speed.md); "
        "precision=fp32 is the faster choice here"
    )


def warn_emulated_bf16(precision: str, device: torch.device, log: logging.Logger | None = None) -> None:
    """Log :func:`emulated_bf16_warning` (when there is one) as a warning."""
    message = emulated_bf16_warning(precision, device)
    if message:
        (log or logger).warning(message)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device``'s type for ``'bf16'``; a no-op context for ``'fp32'``."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def apply_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """Convert ``model``'s 4-D parameters and buffers to channels-last when asked (in place); returns it."""
    if not isinstance(channels_last, bool):
        raise ValueError(f"channels_last: expected True or False, got {channels_last!r}")
    return model.to(memory_format=torch.channels_last) if channels_last else model


def build_sgd(
    params: Iterable[nn.Parameter],
    lr: float,
    momentum: float,
    weight_decay: float,
    impl: str | None = None,
) -> torch.optim.SGD:
    """SGD with torch's default kernels (``impl=None``), multi-tensor ``'foreach'`` or ``'fused'`` ones.

    ``'fused'`` falls back to ``'foreach'``, with a warning, when this torch build or the parameters'
    device does not support it (fused SGD needs torch ≥ 2.3 on CUDA, ≥ 2.4 on CPU).
    """
    if impl not in SGD_IMPLS:
        raise ValueError(f"sgd_impl: expected one of {SGD_IMPLS}, got {impl!r}")
    params = list(params)
    kwargs = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    if impl == "fused":
        try:
            return torch.optim.SGD(params, fused=True, **kwargs)
        except (TypeError, RuntimeError, ValueError) as err:
            logger.warning("sgd_impl='fused' is not supported here (%s); using 'foreach'", err)
            impl = "foreach"
    if impl == "foreach":
        return torch.optim.SGD(params, foreach=True, **kwargs)
    return torch.optim.SGD(params, **kwargs)


def training_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    precision: str = "fp32",
    terms: tuple[str, ...] = (),
) -> torch.Tensor:
    """One optimisation step on a batch of episodes; returns the detached loss ``terms`` (the method's
    ``loss_terms``, ``total`` last) stacked, ``(len(terms),)`` on the device.

    The forward runs under :func:`runtime.autocast`; the output is cast to float32 for the losses (their
    clamped logs and boundary sums need float32). This function adds no host synchronisation.
    """
    supp_imgs = batch["supp_imgs"].to(device, non_blocking=True)
    supp_masks = batch["supp_masks"].to(device, non_blocking=True)
    qry_imgs = batch["qry_imgs"].to(device, non_blocking=True)
    qry_labels = batch["qry_labels"].to(device, non_blocking=True)
    with autocast(device, precision):
        out = model(supp_imgs, supp_masks, qry_imgs)
    if precision != "fp32":
        out = out.float()
    losses = loss_fn(out, qry_labels, supp_masks)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    optimizer.step()
    return torch.stack([losses[name].detach() for name in terms or tuple(losses)])


def freeze_unused_parameters(model: nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on the parameters the model lists as ``unused_parameters`` (kept only so
    that official checkpoints load; they never receive a gradient); returns their names.

    Numerically a no-op (those parameters never get a gradient, so SGD skips them, weight decay included),
    but ``DistributedDataParallel`` then leaves them out of its gradient buckets instead of waiting for
    gradients that never come (which would need ``find_unused_parameters=True``, a graph traversal every
    step, or ``static_graph=True``).
    """
    frozen = []
    for name, param in model.named_parameters():
        if name in getattr(model, "unused_parameters", ()):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a ``torchrun`` job (``world_size == 1``: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the snapshots, the Sacred run folder and the logs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def distributed_from_env() -> DistributedContext:
    """The rank, world size and local rank that ``torchrun`` sets (defaults: a single process)."""
    try:
        context = DistributedContext(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as err:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (torchrun sets them): {err}") from err
    if context.world_size < 1 or not 0 <= context.rank < context.world_size:
        raise ValueError(f"RANK={context.rank} and WORLD_SIZE={context.world_size} are inconsistent")
    return context


def init_distributed(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Start the process group under ``torchrun`` and pick this rank's device.

    On CUDA, rank ``r`` uses ``cuda:LOCAL_RANK`` with the NCCL backend; on CPU, gloo. A single process
    (no ``WORLD_SIZE`` or 1) returns ``device`` unchanged and starts nothing.
    """
    context = distributed_from_env()
    if not context.enabled:
        return context, device
    if device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return context, device


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s global RNGs in a distributed run (a function of ``(seed, rank)``)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_ranks(seed: int, context: DistributedContext, deterministic: bool = False) -> None:
    """Give each rank of a distributed run its own global RNG streams (dropout masks), after the model is
    built from the common seed; a single process keeps the stream of ``seed``."""
    if context.enabled:
        set_seed(rank_seed(seed, context.rank), deterministic)


def wrap_distributed(model: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``device``) when distributed, else ``model``.

    The unused parameters are frozen first (:func:`freeze_unused_parameters`), so the reducer expects a
    gradient for every remaining parameter, every step. Buffers (BatchNorm running statistics) are
    broadcast from rank 0 at every forward (DDP's default): they follow rank 0's episodes.
    """
    freeze_unused_parameters(model)
    if not context.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class EpisodeIndices:
    """Episode indices this rank loads, step by step: a DataLoader ``sampler``.

    Step ``s`` covers the global episodes ``[s·K·b, (s+1)·K·b)``; rank ``r`` takes
    ``[s·K·b + r·b, s·K·b + (r+1)·b)``. With ``K = 1`` this is ``range(start_step·b, n_steps·b)``.
    """

    def __init__(self, start_step: int, n_steps: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if not 0 <= start_step <= n_steps:
            raise ValueError(f"start_step must lie in [0, n_steps={n_steps}], got {start_step}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.start_step, self.n_steps, self.batch_size = start_step, n_steps, batch_size
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return (self.n_steps - self.start_step) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        per_step = self.world_size * self.batch_size
        offset = self.rank * self.batch_size
        for step in range(self.start_step, self.n_steps):
            first = step * per_step + offset
            yield from range(first, first + self.batch_size)
