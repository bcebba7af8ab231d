"""Sizes of the two snapshot kinds for the real DIFD (ResNet-101) model, and what a fold and the paper's table
need under the old policy (every snapshot full) and the keep policy of ``engine/snapshots.py``::

    python benchmarks/snapshot_sizes.py [--decoder-extra-maps] [--n-steps 40000 --every 10000 --runs 25]

The snapshots are written by ``engine.snapshots.save_snapshot`` (SGD with momentum after one step, so the
optimiser holds its momentum buffers, as in training) into a temporary folder and measured on disk.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

from engine.runtime import build_sgd
from engine.snapshots import demote_snapshot, save_snapshot, snapshot_disk_use
from models import build_difd

MB = 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder-extra-maps", action="store_true")
    parser.add_argument("--n-steps", type=int, default=40000)
    parser.add_argument("--every", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=25, help="fold runs of the paper's table")
    args = parser.parse_args()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_difd(pretrained_weights=None, decoder_extra_maps=args.decoder_extra_maps)
    optimizer = build_sgd(model.parameters(), 1e-3, 0.9, 5e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the momentum buffers
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10000], gamma=0.9)
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        path = save_snapshot(
            Path(folder) / "1.pth", step=1, model=model, optimizer=optimizer, scheduler=scheduler, config={}
        )
        full = path.stat().st_size / MB
        demote_snapshot(path)
        weights = path.stat().st_size / MB
    n = len(range(args.every, args.n_steps, args.every)) + 1
    old = n * full
    new, _ = snapshot_disk_use(args.n_steps, args.every, full, weights)
    print(f"DIFD ResNet-101: {n_params / 1e6:.1f} M parameters, decoder_extra_maps={args.decoder_extra_maps}")
    print(f"full snapshot (model + optimiser + RNG): {full:.1f} MB; weights-only: {weights:.1f} MB")
    print(
        f"{args.n_steps}-step fold, a snapshot every {args.every} ({n} snapshots): old policy {old:.0f} MB "
        f"(all full), keep policy {new:.0f} MB ({n - 1} weights-only + 1 full), ratio {new / old:.2f}"
    )
    table_old, table_new = args.runs * old / 1e3, args.runs * new / 1e3
    print(f"{args.runs} fold runs: old policy {table_old:.1f} GB, keep policy {table_new:.1f} GB")


if __name__ == "__main__":
    main()
