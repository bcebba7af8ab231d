"""Time one training step and one evaluation slice of a method: naive loop port vs the vectorised model.

Usage (from the repository root)::

    python -m benchmarks.model --size 128 --device cpu
    python -m benchmarks.model --size 256 --device cuda
    python -m benchmarks.model --size 128 --device cpu --method gmrd

A training step is forward with prototype alignment, the four loss terms, backward and one SGD step
(lr 1e-3, momentum 0.9, weight decay 5e-4); an evaluation slice is one query slice in eval mode without
alignment. Both paths use the same randomly initialised weights (restored before every step) and the same
episode (1 shot, 1 query, a blob-shaped support mask); ``--method``: ``difd`` (its four loss terms) or
``gmrd`` (descriptor layers sized to ``--size``; its two loss terms). Times are medians over
``--repeats`` runs after ``--warmup`` runs, naive and fast interleaved. Needs only torch and torchvision.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

from models import DIFDLoss, build_difd
from models.gmrd import GMRDLoss
from models.gmrd_builder import build_gmrd
from tests import naive_gmrd
from tests.naive_difd import naive_forward, naive_losses


def episode(size: int, device: torch.device, seed: int = 0):
    """A random 1-shot, 1-query episode with blob-shaped support mask and query label."""
    gen = torch.Generator().manual_seed(seed)
    supp = torch.randn(1, 1, 3, size, size, generator=gen)
    qry = torch.randn(1, 1, 3, size, size, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    blob = (((yy - size * 0.5) / (size * 0.25)) ** 2 + ((xx - size * 0.45) / (size * 0.2)) ** 2 <= 1).float()
    masks = blob[None, None]
    labels = torch.roll(blob, shifts=(size // 16, size // 16), dims=(0, 1)).long()[None, None]
    return supp.to(device), masks.to(device), qry.to(device), labels.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image height and width")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--method", choices=("difd", "gmrd"), default="difd")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = (build_difd() if args.method == "difd" else build_gmrd(mlp_size=args.size)).to(device)
    initial = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    loss_fn = (DIFDLoss() if args.method == "difd" else GMRDLoss()).to(device)
    supp, masks, qry, labels = episode(args.size, device)

    def train_naive() -> None:
        if args.method == "gmrd":
            sample = naive_gmrd.random_sampler()
            probs, align, _ = naive_gmrd.naive_forward(model, supp, masks, qry, True, sample)
            (naive_gmrd.naive_query_loss(probs, labels[:, 0]) + align).backward()
            return
        qp, sp = naive_forward(model, supp, masks, qry, align=True)
        naive_losses(qp, sp, labels, masks)["total"].backward()

    def train_fast() -> None:
        loss_fn(model(supp, masks, qry, align=True), labels, masks)["total"].backward()

    def eval_naive() -> None:
        if args.method == "gmrd":
            naive_gmrd.naive_forward(model, supp, masks, qry, False, naive_gmrd.random_sampler())
            return
        naive_forward(model, supp, masks, qry, align=False)

    def eval_fast() -> None:
        model(supp, masks, qry, align=False)

    def timed_train(step) -> float:
        model.load_state_dict(initial)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        step()
        optimizer.step()
        sync(device)
        return time.perf_counter() - start

    def timed_eval(step) -> float:
        model.eval()
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            step()
        sync(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"train naive": [], "train fast": [], "eval naive": [], "eval fast": []}
    for i in range(args.warmup + args.repeats):
        row = {
            "train naive": timed_train(train_naive),
            "train fast": timed_train(train_fast),
            "eval naive": timed_eval(eval_naive),
            "eval fast": timed_eval(eval_fast),
        }
        if i >= args.warmup:
            for k, v in row.items():
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"{args.method.upper()} benchmark: {args.size}x{args.size}, 1 shot, 1 query, device {name}, "
        f"torch {torch.__version__}"
    )
    print(f"median of {args.repeats} runs after {args.warmup} warm-up(s), milliseconds")
    for what in ("train", "eval"):
        naive, fast = med[f"{what} naive"], med[f"{what} fast"]
        label = "training step" if what == "train" else "eval slice   "
        print(f"{label}  naive {naive * 1e3:9.1f}  fast {fast * 1e3:9.1f}  speed-up {naive / fast:5.2f}x")


if __name__ == "__main__":
    main()
