"""DistributedDataParallel training on CPU with the gloo backend, two processes (runtime.py, train.py).

* Two ranks spawned with ``torch.multiprocessing`` train a small DIFD (injected encoder with BatchNorm and an
  unused ``reduce2`` convolution, as the ResNet-101 encoder has) for three steps through
  ``runtime.training_step``: their parameters must stay identical, and match one process that computes each
  rank's slice of the combined batch separately (same per-episode computation: BatchNorm statistics over
  the slice, dropout masks from that rank's RNG stream) and averages the gradients.
* ``train.py`` under ``torchrun`` (debug config on the real CHAOST2 copy): rank 0 alone writes the run
  folder and the snapshots; step 2 of the two-rank run equals one step, from the step-1 snapshot (with
  each rank's saved RNG state), on the gradient averaged over episodes 2 and 3 computed separately; a
  two-rank resume from the step-1 snapshot repeats step 2 exactly; a single-process resume is refused.

Tolerance: the two sides add the same float32 gradients in a different order (gloo's all-reduce then /2,
versus accumulating halves); with one CPU thread on both sides (as here) the observed difference is 0 for
both models, asserted at ``atol=1e-6, rtol=1e-5``. The thread count matters: with two threads in the
reference, ResNet-101's first-layer update differs by up to 1.4 % (2e-4 absolute), because BatchNorm over
two images of a randomly initialised network amplifies the rounding of the convolutions' sums.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from dataloaders import TrainDataset, get_dataset_info, list_cases
from engine.runtime import (
    EpisodeIndices,
    build_sgd,
    init_distributed,
    rank_seed,
    seed_ranks,
    training_step,
    wrap_distributed,
)
from models import DIFDLoss, build_difd
from models.difd import DIFD
from tests.tiny_difd import TinyEncoder, tiny_difd

REPO = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2
BATCH_PER_RANK = 2
N_STEPS = 3
SIZE = 32
ATOL, RTOL = 1e-6, 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _small_model() -> DIFD:
    torch.manual_seed(0)
    return tiny_difd(8, reduce_dim=8, encoder=TinyEncoder(8, batch_norm=True, unused_reduce2=True)).train()


def _episodes(indices: list[int]) -> dict[str, torch.Tensor]:
    """A batch of synthetic 1-shot 1-query episodes; episode ``i`` depends on ``i`` only."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    keys = ("supp_imgs", "supp_masks", "qry_imgs", "qry_labels")
    batch: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for i in indices:
        gen = torch.Generator().manual_seed(1000 + i)
        cy, cx = torch.randint(10, 22, (2,), generator=gen).tolist()
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 36).float()
        batch["supp_imgs"].append(torch.randn(1, 3, SIZE, SIZE, generator=gen) + blob)
        batch["qry_imgs"].append(torch.randn(1, 3, SIZE, SIZE, generator=gen) + blob)
        batch["supp_masks"].append(blob[None])
        batch["qry_labels"].append(blob[None].long())
    return {key: torch.stack(value) for key, value in batch.items()}


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return build_sgd(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    context, device = init_distributed(torch.device("cpu"))
    model = _small_model()
    seed_ranks(0, context)
    model = wrap_distributed(model, context, device)
    optimizer = _optimizer(model)
    loss_fn = DIFDLoss()
    indices = list(EpisodeIndices(0, N_STEPS, BATCH_PER_RANK, rank, WORLD_SIZE))
    for step in range(N_STEPS):
        batch = _episodes(indices[step * BATCH_PER_RANK : (step + 1) * BATCH_PER_RANK])
        training_step(model, loss_fn, optimizer, batch, device)
    torch.save(model.module.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture
def one_thread():
    """The reference runs with one thread, as the spawned/torchrun ranks do (same convolution sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_batches: list[dict[str, torch.Tensor]],
    rank_rng: list[torch.Tensor],
) -> None:
    """One step on the gradient averaged over the ranks' batches, each computed on its own with that rank's
    torch RNG state (``rank_rng``, updated in place: the dropout masks)."""
    loss_fn = DIFDLoss()
    optimizer.zero_grad(set_to_none=True)
    for rank, batch in enumerate(rank_batches):
        torch.set_rng_state(rank_rng[rank])
        out = model(batch["supp_imgs"], batch["supp_masks"], batch["qry_imgs"])
        (loss_fn(out, batch["qry_labels"], batch["supp_masks"])["total"] / len(rank_batches)).backward()
        rank_rng[rank] = torch.get_rng_state()
    optimizer.step()


def _assert_parameters_close(actual: dict[str, torch.Tensor], expected: nn.Module) -> float:
    worst = 0.0
    for name, param in expected.named_parameters():
        torch.testing.assert_close(actual[name], param.detach(), atol=ATOL, rtol=RTOL)
        worst = max(worst, float((actual[name] - param.detach()).abs().max()))
    return worst


def test_episode_indices_split_each_step_between_ranks():
    ranks = [list(EpisodeIndices(1, 3, 2, rank, 3)) for rank in range(3)]
    assert ranks == [[6, 7, 12, 13], [8, 9, 14, 15], [10, 11, 16, 17]]
    assert list(EpisodeIndices(2, 4, 3)) == list(range(6, 12))
    assert len(EpisodeIndices(1, 3, 2, 0, 3)) == 4
    with pytest.raises(ValueError, match="rank"):
        EpisodeIndices(0, 3, 2, rank=2, world_size=2)


def test_two_gloo_ranks_stay_identical_and_match_the_averaged_gradient(tmp_path: Path, one_thread):
    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    model = _small_model()
    # Parameters, not buffers: each rank's last forward updated its own BatchNorm running statistics
    # (DDP re-broadcasts rank 0's at the start of every forward).
    for name, _ in model.named_parameters():
        assert torch.equal(rank0[name], rank1[name]), f"ranks differ in {name}"
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = _optimizer(model)
    rank_rng = [torch.Generator().manual_seed(rank_seed(0, r)).get_state() for r in range(WORLD_SIZE)]
    for step in range(N_STEPS):
        first = step * WORLD_SIZE * BATCH_PER_RANK
        _reference_step(
            model,
            optimizer,
            [
                _episodes(list(range(first + r * BATCH_PER_RANK, first + (r + 1) * BATCH_PER_RANK)))
                for r in range(WORLD_SIZE)
            ],
            rank_rng,
        )
    _assert_parameters_close(rank0, model)
    assert torch.equal(rank0["encoder.reduce2.weight"], initial["encoder.reduce2.weight"])
    assert not torch.equal(rank0["encoder.stem.weight"], initial["encoder.stem.weight"]), "no training"


@pytest.fixture(scope="module")
def mini_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six CHAOST2 cases linked into a temporary data root (fold 1 = positions 4-5)."""
    info = get_dataset_info("CHAOST2")
    root = tmp_path_factory.mktemp("ddp_data")
    image_dir = root / "CHAOST2" / info.image_folder
    sv_dir = root / "CHAOST2" / info.supervoxel_folder()
    image_dir.mkdir(parents=True)
    sv_dir.mkdir(parents=True)
    for case in list_cases("CHAOST2", data_root, supervoxels=True)[:6]:
        for source, folder in ((case.image, image_dir), (case.label, image_dir), (case.supervoxel, sv_dir)):
            (folder / source.name).symlink_to(source)
    return root


@pytest.mark.e2e
def test_train_py_under_torchrun(mini_root: Path, tmp_path: Path, one_thread):
    from engine.snapshots import load_snapshot, read_snapshot
    from train import training_case_ids

    common = [f"data_root={mini_root}", "eval_fold=1", f"path.log_dir={tmp_path}", "n_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def torchrun(*overrides: str) -> None:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
            f"--master_port={_free_port()}", str(REPO / "train.py"), "with", "debug", "save_snapshot_every=1",
            *common, *overrides,
        ]  # fmt: skip
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]

    torchrun()
    fold_dir = tmp_path / "CHAOST2_setting1" / "fold1"
    runs = sorted(p.name for p in (fold_dir / "train").iterdir() if p.name.isdigit())
    assert runs == ["1"], "rank 1 must not open a run"
    assert sorted(p.name for p in (fold_dir / "snapshots").iterdir()) == ["1.pth", "2.pth"]

    # keep policy: the final snapshot holds the weights only, the one before it the resume state
    first = load_snapshot(fold_dir / "snapshots" / "1.pth")
    second = read_snapshot(fold_dir / "snapshots" / "2.pth")
    cfg = first["config"]
    assert cfg["world_size"] == WORLD_SIZE and cfg["batch_size"] == 1
    root = Path(cfg["data_root"])
    dataset = TrainDataset(
        cfg["dataset"], root, cfg["eval_fold"], n_shot=cfg["n_shot"], n_query=cfg["n_query"],
        use_gt=cfg["use_gt"], exclude_label=cfg["exclude_label"], exclusion=cfg["exclusion"],
        min_size=cfg["min_size"], image_size=cfg["image_size"], augment=True, seed=cfg["seed"], length=4,
        n_sv=cfg["n_sv"], test_labels=cfg["test_label"],
        case_ids=training_case_ids(
            cfg["dataset"], root, cfg["eval_fold"], cfg["use_gt"], cfg["n_sv"], cfg["max_volumes"]
        ),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_difd(pretrained_weights=None).train()
    model.load_state_dict(first["model"])
    optimizer = build_sgd(model.parameters(), **cfg["optim"])
    optimizer.load_state_dict(first["optimizer"])
    # Step 2 of the two-rank run: episodes 2 (rank 0) and 3 (rank 1), each a batch of one.
    batches = [{k: torch.as_tensor(v).unsqueeze(0) for k, v in dataset[i].items()} for i in (2, 3)]
    _reference_step(model, optimizer, batches, [state["torch"] for state in first["rng_ranks"]])
    _assert_parameters_close(second["model"], model)

    # Exact resume: from the step-1 snapshot, the two ranks redo step 2 bit for bit.
    (fold_dir / "snapshots" / "2.pth").rename(tmp_path / "uninterrupted_2.pth")
    torchrun("resume=True")
    again = read_snapshot(fold_dir / "snapshots" / "2.pth")
    for name, value in second["model"].items():
        assert torch.equal(again["model"][name], value), f"resumed run differs in {name}"

    resumed = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "with", "debug", *common, "n_steps=3", "resume=True"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert resumed.returncode != 0 and "world_size" in resumed.stderr, resumed.stderr[-2000:]
