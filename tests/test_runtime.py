"""Speed switches (runtime.py): bf16 autocast versus fp32 on real CHAOST2 slices, channels-last, SGD kernels.

bf16 tolerance. No trained DIFD weights exist here, so the check uses the ResNet-101 DIFD with random
weights, its BatchNorm statistics calibrated on one real episode (so that eval-mode activations have a
realistic scale), on real CHAOST2 slices at 64 px (LIVER: support slice 1, two query slices of a query
volume, batched as in evaluation). Measured differences of the [bg, fg] probabilities, bf16 autocast versus
fp32 (CPU, AVX512-BF16): mean 0.016, 99th percentile 0.053, max 0.094 at 64 px; mean 0.014, 99th percentile
0.050, max 0.097 at 128 px. This untrained model is unsure everywhere (fg probabilities 0.40-0.65), the
worst case for the argmax: where it is sure (|p - 0.5| > 0.1) the argmax never changed. Asserted: mean
|Δp| ≤ 0.03, max |Δp| ≤ 0.2 (about twice the measurements). Channels-last changes the fp32 probabilities
by at most 1.2e-5 (asserted ≤ 1e-4).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from dataloaders import TestDataset
from engine.runtime import (
    apply_memory_format,
    autocast,
    build_sgd,
    check_precision,
    emulated_bf16_warning,
    freeze_unused_parameters,
    training_step,
)
from models import DIFDLoss, build_difd
from tests.tiny_difd import TinyEncoder, tiny_difd

SIZE = 64
BF16_MEAN_TOL, BF16_MAX_TOL = 0.03, 0.2


@pytest.fixture(scope="module")
def calibrated(data_root: Path) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """Random-weight DIFD with BatchNorm statistics of real episodes, in eval mode, one real episode and its
    fp32 probabilities."""
    test_set = TestDataset("CHAOST2", data_root, 0, 1, image_size=SIZE)
    support, query = test_set.support(), test_set[0]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_difd()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration passes
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(
            support["imgs"][:1].unsqueeze(0),
            support["masks"][:1].unsqueeze(0),
            query["imgs"][:3].unsqueeze(0),
            align=False,
        )
    mid = query["imgs"].shape[0] // 2
    episode = {
        "supp_imgs": support["imgs"][1:2].unsqueeze(0),
        "supp_masks": support["masks"][1:2].unsqueeze(0),
        "qry_imgs": query["imgs"][mid - 1 : mid + 1].unsqueeze(0),
    }
    model.eval()
    return model, episode, _probs(model, episode, "fp32")


def _probs(model: nn.Module, episode: dict[str, torch.Tensor], precision: str) -> torch.Tensor:
    with torch.no_grad(), autocast(torch.device("cpu"), precision):
        return model(episode["supp_imgs"], episode["supp_masks"], episode["qry_imgs"]).query_probs.float()


def test_bf16_probabilities_stay_close_to_fp32(calibrated):
    model, episode, fp32 = calibrated
    bf16 = _probs(model, episode, "bf16")
    diff = (fp32 - bf16).abs()
    assert float(diff.mean()) <= BF16_MEAN_TOL and float(diff.max()) <= BF16_MAX_TOL, (
        float(diff.mean()),
        float(diff.max()),
    )
    sure = (fp32[:, :, 1] - 0.5).abs() > 0.1
    assert torch.equal((fp32[:, :, 1] > 0.5)[sure], (bf16[:, :, 1] > 0.5)[sure])
    assert not torch.equal(fp32, bf16), "autocast had no effect"


def test_channels_last_gives_the_same_probabilities(calibrated):
    model, episode, fp32 = calibrated
    apply_memory_format(model, True)
    try:
        assert model.decoder1.merge[0].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(_probs(model, episode, "fp32"), fp32, atol=1e-4, rtol=0)
    finally:
        model.to(memory_format=torch.contiguous_format)


def _sgd_trajectory(impl: str | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
    optimizer = build_sgd(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, impl=impl)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(2, 3, 8, 8, generator=gen)).square().mean().backward()
        optimizer.step()
    return model.state_dict()


def test_sgd_kernels_agree():
    reference = _sgd_trajectory(None)
    for impl in ("foreach", "fused"):
        for name, value in _sgd_trajectory(impl).items():
            torch.testing.assert_close(value, reference[name], atol=1e-6, rtol=1e-5, msg=f"{impl} {name}")
    with pytest.raises(ValueError, match="sgd_impl"):
        build_sgd([nn.Parameter(torch.zeros(1))], 0.1, 0.9, 0.0, impl="adam")


def test_bf16_training_step_and_bad_options():
    torch.manual_seed(0)
    model = tiny_difd(8, reduce_dim=8, encoder=TinyEncoder(8, unused_reduce2=True)).train()
    assert freeze_unused_parameters(model) == ["encoder.reduce2.weight"]
    optimizer = build_sgd(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    size = 32
    masks = torch.zeros(1, 1, size, size)
    masks[..., 8:24, 10:26] = 1
    batch = {
        "supp_imgs": torch.randn(1, 1, 3, size, size),
        "supp_masks": masks,
        "qry_imgs": torch.randn(1, 1, 3, size, size),
        "qry_labels": masks.long(),
    }
    terms = training_step(model, DIFDLoss(), optimizer, batch, torch.device("cpu"), "bf16")
    assert terms.dtype == torch.float32 and terms.shape == (5,) and torch.isfinite(terms).all()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="precision"):
        check_precision("fp16")
    with pytest.raises(ValueError, match="channels_last"):
        apply_memory_format(model, "yes")


def test_emulated_bf16_warns_with_the_cost_and_the_faster_choice(monkeypatch: pytest.MonkeyPatch):
    from engine import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    message = emulated_bf16_warning("bf16", cpu)
    assert "without bfloat16 instructions" in message and "44 s in bf16 against 1.3 s in fp32" in message
    assert message.endswith("precision=fp32 is the faster choice here")
    assert emulated_bf16_warning("fp32", cpu) is None
    assert emulated_bf16_warning("bf16", torch.device("cuda")) is None  # a GPU's bf16 is native
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert emulated_bf16_warning("bf16", cpu) is None
