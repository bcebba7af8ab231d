"""Side-by-side speed of the naive loop port and the fast DIFD, fp32 and bf16, plus the loader's episodes/s.

Usage (from the repository root)::

    python -m benchmarks.speed --size 128 --device cpu --repeats 3 --warmup 1
    python -m benchmarks.speed --size 256 --device cuda --repeats 20 --warmup 5 --workers 0 1 4

Rows, for each precision (``fp32``; ``bf16`` autocast of the forward, losses in float32):

* ``naive``: the loop port of ``tests/naive_difd.py`` (the official code's structure), torch's default SGD;
* ``fast``: the vectorised model through ``runtime.training_step``, the step ``train.py`` runs;
* ``fast+cl+fused``: the same with ``channels_last=True`` and ``sgd_impl='fused'``.

Columns: median milliseconds per training step (forward with prototype alignment, the four loss terms,
backward, SGD step: lr 1e-3, momentum 0.9, weight decay 5e-4, on a 1-shot 1-query episode; the weights
are restored before every step), median milliseconds per evaluation slice (eval mode, one forward holding a
chunk of ``--eval-chunk`` query slices, as ``test.py`` batches them, divided by the chunk size), peak CUDA
memory of the training step (n/a on CPU) and the projected time of a 40000-step ``official_script`` run.

Loader: episodes per second of ``TrainDataset`` (gamma, affine and elastic augmentation at ``--size``)
through a DataLoader with each of ``--workers`` (0 = main process). With a NIfTI reader (SimpleITK or
nibabel, see ``dataloaders.nifti``) and a data root it reads real CHAOST2 volumes (``loader: CHAOST2``);
otherwise (e.g. a GPU host with neither, or no data) it builds ``TrainDataset`` on synthetic in-memory
volumes of CHAOST2's size (``loader: synthetic``: 8 volumes of 36 slices, smooth random images, block
supervoxels of 6 slices x 32 x 32 px), so the same sampling and augmentation code runs. Needs torch,
torchvision, numpy and OpenCV only (no Sacred; SimpleITK or nibabel only for the real volumes).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.model import episode
from dataloaders import Case, CaseFiles, Geometry, TrainDataset, Volume, worker_init_fn
from engine.runtime import apply_memory_format, autocast, build_sgd, training_step
from models import DIFDLoss, build_difd
from tests.naive_difd import naive_forward, naive_losses
from tests.tiny_difd import tiny_difd
from utils import resolve_data_root

OFFICIAL_STEPS = 40000
VARIANTS = ("naive", "fast", "fast+cl+fused")


class SyntheticTrainDataset(TrainDataset):
    """``TrainDataset`` whose volumes are made in memory instead of read from NIfTI files (benchmark only).

    Shapes: ``n_volumes`` volumes of ``(n_slices, 256, 256)`` (CHAOST2's native size), resized to
    ``image_size`` like real ones.
    """

    def __init__(self, n_volumes: int = 8, n_slices: int = 36, **kwargs) -> None:
        self._synthetic = (n_volumes, n_slices)
        super().__init__("CHAOST2", "<memory>", 0, **kwargs)

    def _load(self, data_root, eval_fold, n_sv, case_ids):
        import cv2

        n_volumes, n_slices = self._synthetic
        gen = np.random.default_rng(0)
        z, y, x = np.meshgrid(np.arange(n_slices), np.arange(256), np.arange(256), indexing="ij")
        blocks = (z // 6) * 64 + (y // 32) * 8 + (x // 32) + 1
        geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        volumes = []
        for case_id in range(n_volumes):
            noise = gen.standard_normal((n_slices, 256, 256)).astype(np.float32)
            smooth = np.stack([cv2.GaussianBlur(s, (0, 0), 8) for s in noise]) * 20 + noise
            files = CaseFiles(case_id, Path(f"<synthetic {case_id}>"), Path("<none>"), Path("<synthetic sv>"))
            label = np.zeros(blocks.shape, np.uint8)
            volume = Case(
                case_id,
                Volume(smooth.astype(np.float32), geometry),
                Volume(label, geometry),
                Volume(blocks, geometry),
                files,
            )
            volumes.append(self._prepare(volume))
        return volumes


def median_ms(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA synchronised around each call)."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def count_syncs(step: Callable[[], None], device: torch.device) -> None:
    """Run one step with CUDA's synchronisation debug mode and print the host syncs it reports."""
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    print(f"  host-device synchronisations in one fast training step: {len(syncs)}", flush=True)
    for place in sorted(set(syncs)):
        print(f"    {syncs.count(place)} x {place}", flush=True)


def model_rows(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, float, float, str]]:
    """``(precision, variant, train ms, eval ms per slice, peak memory)`` for every row."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = (tiny_difd(8, reduce_dim=8) if args.tiny else build_difd()).to(device)
    initial = copy.deepcopy(model.state_dict())
    loss_fn = DIFDLoss().to(device)
    supp, masks, qry, labels = episode(args.size, device)
    batch = {"supp_imgs": supp, "supp_masks": masks, "qry_imgs": qry, "qry_labels": labels}
    gen = torch.Generator().manual_seed(1)
    chunk = torch.randn(1, args.eval_chunk, 3, args.size, args.size, generator=gen).to(device)

    rows = []
    for precision in args.precisions:
        for variant in VARIANTS:
            fast = variant != "naive"
            model.to(memory_format=torch.contiguous_format)
            model.load_state_dict(initial)
            apply_memory_format(model, variant == "fast+cl+fused")
            impl = "fused" if "fused" in variant else None
            optimizer = build_sgd(model.parameters(), 1e-3, 0.9, 5e-4, impl)

            def train_step(precision=precision, fast=fast, optimizer=optimizer) -> None:
                model.load_state_dict(initial)
                model.train()
                if fast:
                    training_step(model, loss_fn, optimizer, batch, device, precision)
                    return
                with autocast(device, precision):
                    qp, sp = naive_forward(model, supp, masks, qry, align=True)
                sp = [None if p is None else p.float() for p in sp]
                optimizer.zero_grad(set_to_none=True)
                naive_losses(qp.float(), sp, labels, masks)["total"].backward()
                optimizer.step()

            def eval_chunk(precision=precision, fast=fast) -> None:
                model.eval()
                with torch.no_grad(), autocast(device, precision):
                    if fast:
                        model(supp, masks, chunk, align=False)
                    else:
                        naive_forward(model, supp, masks, chunk, align=False)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            train_ms = median_ms(train_step, device, args.warmup, args.repeats)
            peak = "n/a"
            if device.type == "cuda":
                peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
            eval_ms = median_ms(eval_chunk, device, args.warmup, args.repeats) / args.eval_chunk
            rows.append((precision, variant, train_ms, eval_ms, peak))
            if device.type == "cuda" and variant == "fast" and precision == args.precisions[0]:
                count_syncs(train_step, device)
            print(
                f"  {precision:<5} {variant:<14} {train_ms:10.1f} {eval_ms:10.2f} {peak:>10} "
                f"{train_ms * OFFICIAL_STEPS / 6e4:10.1f}",
                flush=True,
            )
    return rows


def loader_rate(args: argparse.Namespace) -> None:
    """Print episodes/s of TrainDataset for each worker count."""
    # min_size (200 px at 256 px) scaled with the slice area, as the debug config does at 64 px.
    kwargs = {
        "image_size": None if args.size == 256 else args.size,
        "augment": True,
        "length": args.episodes,
        "min_size": max(1, round(200 * (args.size / 256) ** 2)),
    }
    source = "synthetic"
    if not args.synthetic_loader:
        try:
            dataset = TrainDataset("CHAOST2", resolve_data_root(args.data_root), 0, **kwargs)
            source = "CHAOST2 fold 0"
        except (FileNotFoundError, ImportError):  # no data here, or no NIfTI reader installed
            dataset = SyntheticTrainDataset(**kwargs)
    else:
        dataset = SyntheticTrainDataset(**kwargs)
    for workers in args.workers:
        if workers == 0:
            items = (dataset[i] for i in range(len(dataset)))
        else:
            loader = DataLoader(dataset, batch_size=1, num_workers=workers, worker_init_fn=worker_init_fn)
            items = iter(loader)
        next(items)  # the clock starts at the first episode: worker start-up is left out
        start = time.perf_counter()
        count = sum(1 for _ in items)
        rate = count / (time.perf_counter() - start)
        print(
            f"  loader ({source}, {args.size} px, augmentation on): workers={workers}: {rate:.1f} episodes/s "
            f"({count} episodes)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precisions", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"], help="none: loader"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eval-chunk", type=int, default=8, help="query slices per evaluation forward")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--episodes", type=int, default=300, help="episodes per loader measurement")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1], help="loader workers to try")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--synthetic-loader", action="store_true", help="synthetic volumes even with data")
    parser.add_argument(
        "--tiny", action="store_true", help="conv-stem encoder, not ResNet-101 (a smoke test, no measurement)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what train.py does (utils.set_seed, deterministic=False)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    encoder = "tiny conv-stem encoder (smoke test)" if args.tiny else "ResNet-101"
    print(
        f"DIFD speed ({encoder}): {args.size}x{args.size}, 1 shot, 1 query, device {name}, "
        f"torch {torch.__version__}"
    )
    print(f"median of {args.repeats} runs after {args.warmup} warm-ups; eval chunk {args.eval_chunk} slices")
    print(f"  {'prec':<5} {'model':<14} {'train ms':>10} {'eval ms/sl':>10} {'peak mem':>10} {'40k min':>10}")
    if args.precisions:
        model_rows(args, device)
    if args.workers:
        loader_rate(args)


if __name__ == "__main__":
    main()
