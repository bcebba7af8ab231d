"""Time one Q-Net training step and one evaluation slice: the naive loop port (tests/naive_qnet.py, the
official code's structure) vs the vectorised model (models/qnet.py), same ResNet-101 weights and episode.

Usage (from the repository root)::

    python -m benchmarks.qnet --size 64 --threads 1

A training step is forward with prototype alignment, both loss terms, backward and one SGD step (lr 1e-3,
momentum 0.9, weight decay 5e-4); an evaluation slice is one query slice in eval mode with the official
test-time refinement (``--refine-iters``, official 7). The weights are restored before every step; times
are medians over ``--repeats`` runs after ``--warmup`` runs, naive and fast interleaved. Printed: the
milliseconds of each and the ratio naive / fast.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

from benchmarks.model import episode
from models.qnet import QNetLoss, build_qnet
from tests.naive_qnet import naive_forward, naive_query_loss

SGD = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--refine-iters", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_qnet(refine_iters=args.refine_iters)
    initial = copy.deepcopy(model.state_dict())
    supp, masks, qry, labels = episode(args.size, torch.device("cpu"))

    def train(fast: bool) -> float:
        model.load_state_dict(initial)
        model.train()
        optimiser = torch.optim.SGD(model.parameters(), **SGD)
        start = time.perf_counter()
        if fast:
            QNetLoss()(model(supp, masks, qry), labels, masks)["total"].backward()
        else:
            probs, align = naive_forward(model.encoder, supp, masks, qry, train=True)
            (naive_query_loss(probs, labels) + align).backward()
        optimiser.step()
        optimiser.zero_grad()
        return time.perf_counter() - start

    def evaluate(fast: bool) -> float:
        model.eval()
        start = time.perf_counter()
        with torch.inference_mode() if fast else torch.no_grad():
            if fast:
                model(supp, masks, qry)
            else:
                naive_forward(model.encoder, supp, masks, qry, train=False, n_iters=args.refine_iters)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {
        key: [] for key in ("train naive", "train fast", "eval naive", "eval fast")
    }
    for run in range(args.warmup + args.repeats):
        sample = {
            "train naive": train(False),
            "train fast": train(True),
            "eval naive": evaluate(False),
            "eval fast": evaluate(True),
        }
        if run >= args.warmup:
            for key, value in sample.items():
                times[key].append(value)
    print(
        f"Q-Net, ResNet-101, {args.size} px, {torch.get_num_threads()} thread(s), CPU, "
        f"medians of {args.repeats}"
    )
    for what, label in (
        ("train", "training step      "),
        ("eval", f"eval slice (refine {args.refine_iters})"),
    ):
        naive, fast = (statistics.median(times[f"{what} {kind}"]) for kind in ("naive", "fast"))
        print(
            f"{label}  naive {naive * 1e3:9.1f} ms  fast {fast * 1e3:9.1f} ms  "
            f"naive/fast {naive / fast:5.2f}x"
        )


if __name__ == "__main__":
    main()
