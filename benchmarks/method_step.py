"""Time one training step of any registered method beside its naive loop port (``tests/naive_<method>.py``,
function ``naive_training_terms(model, supp, masks, qry, labels)`` → loss terms).

Usage (from the repository root)::

    python -m benchmarks.method_step --method adnet --size 64 --threads 2

A step is forward (training mode, with the method's alignment), the loss terms, backward and one SGD step
(lr 1e-3, momentum 0.9, weight decay 5e-4), from the same randomly initialised weights (restored before
every step) on the same random 1-shot, 1-query episode (``benchmarks.model.episode``). Printed: the median
milliseconds of the fast and the naive step over ``--repeats`` interleaved runs after ``--warmup``, their
ratio, and the largest difference of their total losses. Needs only torch and torchvision.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import time
import warnings

import torch

from benchmarks.model import episode, sync
from models import get_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, help="a registered method with a tests/naive_<method>.py")
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    method = get_method(args.method)
    try:
        naive_terms = importlib.import_module(f"tests.naive_{method.name}").naive_training_terms
    except (ImportError, AttributeError) as err:
        raise SystemExit(
            f"--method {method.name}: no tests/naive_{method.name}.naive_training_terms ({err})"
        ) from err

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = method.build(method.options_of({}), None, None).to(device)
    loss_fn = method.loss(dict(method.loss_weights), method.options_of({})).to(device)
    initial = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    supp, masks, qry, labels = episode(args.size, device)
    paths = {
        "fast": lambda: loss_fn(model(supp, masks, qry), labels, masks),
        "naive": lambda: naive_terms(model, supp, masks, qry, labels),
    }

    def timed(name: str) -> tuple[float, float]:
        model.load_state_dict(initial)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        total = paths[name]()["total"].sum()
        total.backward()
        optimizer.step()
        sync(device)
        return time.perf_counter() - start, float(total.detach())

    times: dict[str, list[float]] = {name: [] for name in paths}
    totals: dict[str, float] = {}
    for i in range(args.warmup + args.repeats):
        for name in paths:
            seconds, totals[name] = timed(name)
            if i >= args.warmup:
                times[name].append(seconds)
    med = {name: statistics.median(v) for name, v in times.items()}
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"{method.title} training step: {args.size}x{args.size}, 1 shot, 1 query, {where}, "
        f"torch {torch.__version__}"
    )
    print(f"median of {args.repeats} runs after {args.warmup} warm-up(s), milliseconds")
    print(
        f"naive {med['naive'] * 1e3:9.1f}  fast {med['fast'] * 1e3:9.1f}  "
        f"speed-up {med['naive'] / med['fast']:5.2f}x"
        f"  |Δ total loss| {abs(totals['naive'] - totals['fast']):.2e}"
    )


if __name__ == "__main__":
    main()
