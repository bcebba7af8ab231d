"""The CUDA paths (marker ``cuda``; skipped with their reason where torch sees no GPU, so CI stays green).

Run by ``script/gpu_check.sh`` (``python -m pytest -m cuda``) on the first GPU available:

* the ResNet-101 DIFD on CUDA against the CPU in float32, same weights (BatchNorm calibrated on a real
  episode, :func:`tests.test_runtime.calibrated`), real CHAOST2 slices at 64 px, TF32 off: the float32
  end-to-end tolerance of the fast model against the naive port (``atol=1e-4``, docs/speed.md);
* bf16 autocast on CUDA against float32 on the CPU within the documented bf16 tolerance (mean |Δp| ≤ 0.03,
  max ≤ 0.2, tests/test_runtime.py);
* a training step (``runtime.training_step``) and an evaluation chunk (``evaluation.predict_query_volume``)
  on CUDA against the CPU;
* a snapshot written on CUDA, resumed on the CPU, and one written on the CPU resumed on CUDA: weights,
  momentum buffers and step bit-exact (a copy between devices changes no bit), the next step within the
  float32 tolerance (the two devices' kernels sum in a different order);
* one NCCL process (world size 1) through ``runtime.init_distributed``/``wrap_distributed``: the step equals
  the plain step on the same GPU.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.evaluation import predict_query_volume
from engine.runtime import DistributedContext, autocast, build_sgd, training_step, unwrap, wrap_distributed
from engine.snapshots import load_snapshot, restore_training_state, save_snapshot
from models import DIFDLoss
from tests.test_distributed import _episodes, _small_model
from tests.test_runtime import BF16_MAX_TOL, BF16_MEAN_TOL, calibrated  # noqa: F401 (the fixture)

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
FP32_ATOL = 1e-4  # the fast model's float32 end-to-end tolerance against the naive port (docs/speed.md)


@pytest.fixture(autouse=True)
def no_tf32():
    """Float32 on CUDA as on the CPU: cuDNN's TF32 convolutions (torch's default) keep 10 mantissa bits."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def _without_dropout(model: nn.Module) -> nn.Module:
    """Dropout off (BatchNorm stays in training mode): the CPU and CUDA generators draw different masks."""
    for module in model.modules():
        if isinstance(module, nn.Dropout2d):
            module.eval()
    return model


def _probs(model: nn.Module, episode: dict[str, torch.Tensor], device: torch.device, precision: str):
    with torch.no_grad(), autocast(device, precision):
        out = model(*(episode[key].to(device) for key in ("supp_imgs", "supp_masks", "qry_imgs")))
        return out.query_probs.float().cpu()


def test_fast_model_on_cuda_matches_the_cpu_in_fp32(calibrated):  # noqa: F811
    model, episode, cpu_probs = calibrated
    gpu_model = copy.deepcopy(model).to(CUDA)
    torch.testing.assert_close(_probs(gpu_model, episode, CUDA, "fp32"), cpu_probs, atol=FP32_ATOL, rtol=0)


def test_bf16_autocast_on_cuda_within_the_documented_tolerance(calibrated):  # noqa: F811
    model, episode, cpu_probs = calibrated
    bf16 = _probs(copy.deepcopy(model).to(CUDA), episode, CUDA, "bf16")
    diff = (bf16 - cpu_probs).abs()
    assert float(diff.mean()) <= BF16_MEAN_TOL and float(diff.max()) <= BF16_MAX_TOL, (
        float(diff.mean()),
        float(diff.max()),
    )
    assert not torch.equal(bf16, cpu_probs), "autocast had no effect"


def test_training_step_and_evaluation_chunk_on_cuda(calibrated, data_root: Path):  # noqa: F811
    from dataloaders import TestDataset

    model, episode, _ = calibrated
    # Evaluation: one query volume's labelled slices in chunks, as test.py runs them.
    test_set = TestDataset("CHAOST2", data_root, 0, 1, image_size=64)
    support, query = test_set.support(), test_set[0]
    cpu_pred = predict_query_volume(model, support, query, CPU)
    gpu_pred = predict_query_volume(copy.deepcopy(model).to(CUDA), support, query, CUDA)
    assert gpu_pred.shape == cpu_pred.shape and gpu_pred.device == CPU
    agree = float((gpu_pred == cpu_pred).float().mean())
    assert agree >= 0.999, f"{agree:.4%} of the pixels agree"
    # Training: one step from the same weights on each device.
    batch = {**episode, "qry_labels": (episode["qry_imgs"][:, :, 0] > episode["qry_imgs"].mean()).long()}
    results = {}
    for device in (CPU, CUDA):
        trained = _without_dropout(copy.deepcopy(model).to(device).train())
        optimizer = build_sgd(trained.parameters(), 1e-3, 0.9, 5e-4)
        terms = training_step(trained, DIFDLoss().to(device), optimizer, batch, device)
        assert terms.device.type == device.type and bool(torch.isfinite(terms).all())
        results[device.type] = (terms.cpu(), {k: v.cpu() for k, v in trained.state_dict().items()})
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], atol=1e-3, rtol=1e-3)
    for name, value in results["cpu"][1].items():
        if value.is_floating_point():
            torch.testing.assert_close(results["cuda"][1][name], value, atol=FP32_ATOL, rtol=1e-3, msg=name)


def _trained_pair(
    device: torch.device,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = _without_dropout(_small_model().to(device))
    optimizer = build_sgd(model.parameters(), 0.05, 0.9, 5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10], gamma=0.95)
    return model, optimizer, scheduler


@pytest.mark.parametrize(
    ("write_on", "resume_on"), [(CUDA, CPU), (CPU, CUDA)], ids=["cuda-to-cpu", "cpu-to-cuda"]
)
def test_snapshot_resumes_across_devices(tmp_path: Path, write_on: torch.device, resume_on: torch.device):
    model, optimizer, scheduler = _trained_pair(write_on)
    training_step(model, DIFDLoss().to(write_on), optimizer, _episodes([0, 1]), write_on)
    scheduler.step()
    path = save_snapshot(
        tmp_path / "1.pth",
        step=1,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        config={"n_steps": 3},
    )
    resumed, resumed_opt, resumed_sched = _trained_pair(resume_on)
    step = restore_training_state(path, load_snapshot(path), resumed, resumed_opt, resumed_sched)
    assert step == 1
    for name, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name].cpu(), value.cpu()), f"{name} changed"
    for param, resumed_param in zip(model.parameters(), resumed.parameters(), strict=True):
        if param.grad is None:  # the unused reduce2: no momentum
            assert not resumed_opt.state.get(resumed_param)
            continue
        buffer = resumed_opt.state[resumed_param]["momentum_buffer"]
        assert buffer.device.type == resume_on.type
        assert torch.equal(buffer.cpu(), optimizer.state[param]["momentum_buffer"].cpu())
    # The next step on each side: the same maths on two devices' kernels.
    for trained, opt, device in ((model, optimizer, write_on), (resumed, resumed_opt, resume_on)):
        training_step(trained, DIFDLoss().to(device), opt, _episodes([2, 3]), device)
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed.state_dict()[name].cpu(), value.cpu(), atol=1e-5, rtol=1e-4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_process_nccl_ddp_step(monkeypatch: pytest.MonkeyPatch):
    """One rank of NCCL (what ``torchrun --nproc_per_node=N train.py`` starts per GPU): the wrapped step
    equals the plain one on the same GPU (an all-reduce over one rank only divides by 1)."""
    if not torch.distributed.is_nccl_available():
        pytest.fail("this torch build has no NCCL: multi-GPU training (torchrun) cannot run here")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    plain, plain_opt, _ = _trained_pair(CUDA)
    wrapped, wrapped_opt, _ = _trained_pair(CUDA)
    torch.distributed.init_process_group(backend="nccl", world_size=1, rank=0)
    try:
        # wrap_distributed's own freezing (the unused reduce2), then DDP as it wraps a rank of several.
        assert wrap_distributed(wrapped, DistributedContext(), CUDA) is wrapped
        ddp = nn.parallel.DistributedDataParallel(wrapped, device_ids=[torch.cuda.current_device()])
        assert unwrap(ddp) is wrapped
        batch = _episodes([0, 1])
        for model, opt in ((plain, plain_opt), (ddp, wrapped_opt)):
            torch.manual_seed(0)
            training_step(model, DIFDLoss().to(CUDA), opt, batch, CUDA)
        torch.cuda.synchronize()
    finally:
        torch.distributed.destroy_process_group()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(wrapped.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name)
