"""Episodes per second of TrainDataset (method.md §3), in the main process and through a DataLoader.

The GPU needs about 30 episodes/s; this measures what one CPU worker gives at the native 256x256 (or
``--image-size``) with augmentation on::

    python benchmarks/loader_throughput.py --dataset CHAOST2 --episodes 500 --workers 0 1
"""

from __future__ import annotations

import argparse
import time

from torch.utils.data import DataLoader

from dataloaders import TrainDataset, worker_init_fn
from utils import resolve_data_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="CHAOST2", choices=["CHAOST2", "SABS", "CMR"])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--eval-fold", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--no-augment", action="store_true")
    args = parser.parse_args()

    start = time.perf_counter()
    dataset = TrainDataset(
        args.dataset,
        resolve_data_root(args.data_root),
        args.eval_fold,
        image_size=args.image_size,
        augment=not args.no_augment,
        length=args.episodes,
    )
    print(
        f"{args.dataset} fold {args.eval_fold}: {len(dataset.volumes)} volumes loaded in "
        f"{time.perf_counter() - start:.1f} s"
    )
    for workers in args.workers:
        start = time.perf_counter()
        if workers == 0:
            for i in range(len(dataset)):
                dataset[i]
        else:
            for _ in DataLoader(dataset, batch_size=1, num_workers=workers, worker_init_fn=worker_init_fn):
                pass
        elapsed = time.perf_counter() - start
        print(
            f"workers={workers}: {len(dataset) / elapsed:.1f} episodes/s ({len(dataset)} episodes, "
            f"{elapsed:.2f} s, augment={not args.no_augment}, image_size={args.image_size})"
        )


if __name__ == "__main__":
    main()
