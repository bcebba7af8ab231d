"""Can a CPU training step be made faster at no cost in faithfulness? Times one DIFD training step
(ResNet-101, 64 px by default: the demo's and the learning checks' size) for each way of running it, in one
run:

* ``eager``: today's path (``engine.runtime.training_step``), torch's default thread count;
* ``eager, 1 thread``: the same on one thread (``torch.set_num_threads(1)``) — thread settings;
* ``channels-last``: NHWC convolution weights (``channels_last=True``);
* ``compile encoder``: ``torch.compile`` (inductor, CPU) of the ResNet-101 encoder, the part that holds
  almost all the work and whose shapes never change; the head's prototype counts depend on the masks, so
  it stays eager;
* ``compile model``: ``torch.compile`` of the whole model (graph breaks where the head needs host values);
* ``oneDNN fusion``: oneDNN Graph fusion (``torch.jit.enable_onednn_fusion``) on a traced encoder.

Usage::

    python -m benchmarks.cpu_step [--size 64] [--precision bf16 fp32] [--repeats 5] [--steps 4] [--warmup 3]

Each variant gets its own copy of the same initial model and its own SGD; variants are interleaved
(``--repeats`` rounds of ``--steps`` steps each, every variant in every round) so that a change of load on
the machine touches all of them alike; the first ``--warmup`` steps (compilation included, reported apart)
are not timed. Printed per precision: median milliseconds per step, the ratio to ``eager``, the warm-up
seconds, and the largest difference of the query probabilities from ``eager`` in eval mode and float32 on
a fixed episode (same weights; dropout and bf16 off, so the difference is the variant's arithmetic alone). A
variant that fails says why. Episodes: real CHAOST2 fold 0 episodes when a data root is found, else synthetic
ones of the same size.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import traceback
import warnings

import torch
from torch import nn

from benchmarks.model import episode
from dataloaders import TrainDataset
from dataloaders.train_dataset import scaled_min_size
from engine.runtime import apply_memory_format, build_sgd, training_step
from models import DIFDLoss, build_difd
from utils import resolve_data_root

VARIANTS = ("eager", "eager, 1 thread", "channels-last", "compile encoder", "compile model", "oneDNN fusion")


def batches(size: int, count: int) -> tuple[list[dict[str, torch.Tensor]], str]:
    """``count`` training batches of one episode at ``size`` px, and what they are: real CHAOST2 episodes
    when a data root is found, else synthetic ones."""
    try:
        data = TrainDataset(
            "CHAOST2",
            resolve_data_root(),
            0,
            image_size=size,
            min_size=scaled_min_size(size),
            case_ids=[10, 13, 15],
            length=count,
            seed=0,
        )
        items = [data[i] for i in range(count)]
        tensors = [
            {key: value.unsqueeze(0) for key, value in item.items() if torch.is_tensor(value)}
            for item in items
        ]
        return tensors, "real CHAOST2 fold 0 episodes (cases 10, 13, 15)"
    except FileNotFoundError:
        out = []
        for seed in range(count):
            supp, masks, qry, labels = episode(size, torch.device("cpu"), seed)
            out.append({"supp_imgs": supp, "supp_masks": masks, "qry_imgs": qry, "qry_labels": labels})
        return out, "synthetic episodes (no data root found)"


def make_variant(
    name: str, base: nn.Module, example: dict[str, torch.Tensor], train: bool = True
) -> nn.Module:
    """A copy of ``base`` in training (or eval) mode, run the way ``name`` says (module docstring); a traced
    encoder keeps the mode it was traced in."""
    model = copy.deepcopy(base).train(train)
    if name == "channels-last":
        apply_memory_format(model, True)
    elif name == "compile encoder":
        model.encoder = torch.compile(model.encoder, dynamic=False)
    elif name == "compile model":
        model = torch.compile(model, dynamic=False)
    elif name == "oneDNN fusion":
        torch.jit.enable_onednn_fusion(True)
        images = torch.cat([example["supp_imgs"].flatten(0, 1), example["qry_imgs"].flatten(0, 1)])
        model.encoder = torch.jit.trace(model.encoder, images, check_trace=False)
    return model


def threads_for(name: str, default: int) -> int:
    return 1 if name == "eager, 1 thread" else default


def eval_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Query probabilities in eval mode and float32: the variant's arithmetic, dropout and bf16 aside."""
    with torch.no_grad():
        return model.eval()(batch["supp_imgs"], batch["supp_masks"], batch["qry_imgs"]).query_probs


def run(
    precision: str, args: argparse.Namespace, base: nn.Module, data: list[dict[str, torch.Tensor]]
) -> None:
    device, default_threads = torch.device("cpu"), torch.get_num_threads()
    loss_fn = DIFDLoss()
    reference = eval_probs(copy.deepcopy(base), data[0])
    states: dict[str, dict] = {}
    for name in args.variants:
        torch.set_num_threads(threads_for(name, default_threads))
        try:
            model = make_variant(name, base, data[0]).train()
            optimizer = build_sgd(model.parameters(), 1e-3, 0.9, 5e-4)
            start = time.perf_counter()
            for i in range(args.warmup):
                training_step(model, loss_fn, optimizer, data[i % len(data)], device, precision)
            warmup = time.perf_counter() - start
            if name == "oneDNN fusion":
                torch.jit.enable_onednn_fusion(True)
            fresh = make_variant(name, base, data[0], train=False)  # the untrained copy's arithmetic
            difference = float((eval_probs(fresh, data[0]) - reference).abs().max())
            states[name] = {
                "model": model,
                "optimizer": optimizer,
                "warmup": warmup,
                "diff": difference,
                "ms": [],
            }
        except Exception as err:  # noqa: BLE001 (a variant that does not run is a result to report)
            states[name] = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"}
            if args.verbose:
                traceback.print_exc()
        finally:
            torch.set_num_threads(default_threads)
            torch.jit.enable_onednn_fusion(False)
    for _ in range(args.repeats):
        for name, state in states.items():
            if "error" in state:
                continue
            torch.set_num_threads(threads_for(name, default_threads))
            torch.jit.enable_onednn_fusion(name == "oneDNN fusion")
            start = time.perf_counter()
            for i in range(args.steps):
                training_step(
                    state["model"], loss_fn, state["optimizer"], data[i % len(data)], device, precision
                )
            state["ms"].append(1e3 * (time.perf_counter() - start) / args.steps)
            torch.set_num_threads(default_threads)
            torch.jit.enable_onednn_fusion(False)
    base_ms = statistics.median(states["eager"]["ms"]) if "ms" in states.get("eager", {}) else float("nan")
    print(f"\nprecision {precision}, {args.size} px, {default_threads} threads by default, "
          f"medians of {args.repeats} rounds of {args.steps} steps")  # fmt: skip
    print(f"{'variant':<18} {'ms/step':>9} {'vs eager':>9} {'warm-up s':>10} {'|Δp| fp32':>10}  rounds (ms)")
    for name, state in states.items():
        if "error" in state:
            print(f"{name:<18} did not run: {state['error']}")
            continue
        ms = statistics.median(state["ms"])
        rounds = " ".join(f"{v:.0f}" for v in state["ms"])
        cells = f"{ms:9.0f} {base_ms / ms:8.2f}x {state['warmup']:10.1f} {state['diff']:10.2e}"
        print(f"{name:<18} {cells}  {rounds}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a variant that fails")
    args = parser.parse_args(argv)
    if "eager" not in args.variants:
        args.variants.insert(0, "eager")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random initialisation: no pretrained file here
        base = build_difd().train()
    data, source = batches(args.size, max(args.warmup, args.steps))
    print(f"torch {torch.__version__}; {source}")
    for precision in args.precision:
        run(precision, args, base, data)


if __name__ == "__main__":
    main()
