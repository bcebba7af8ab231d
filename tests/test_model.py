"""DIFD head: the fast (vectorised) model against the naive loop port, on random feature maps.

A tiny injected encoder (one strided conv to C = 32 channels at H/4 and a linear threshold) and narrow
decoders keep the combinatorial cases fast; the real ResNet-101 model runs end to end in
``test_model_resnet.py``. Comparisons run in float64 so that they test the algebra, with
``atol = 1e-9, rtol = 1e-7`` (observed differences are about 1e-12); one float32 case states the float32
tolerance (``atol = 2e-5, rtol = 1e-4``).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from models import DIFD, DIFDLoss, build_difd
from models.difd import DIFDOutput
from models.dual_interspersion import OFFICIAL_SEED, DualInterspersion, draw_boxes, subsample_plan
from models.prototypes import bilinear_weights, masked_sum
from tests.naive_difd import F64_TOL, naive_boxes, naive_forward, naive_losses
from tests.tiny_difd import TinyEncoder, tiny_difd

F32_TOL = {"atol": 2e-5, "rtol": 1e-4}
CHANNELS = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(
    dtype=torch.float64,
    seed: int = 1,
    multi_shot: str = "official",
    decoder_extra_maps: bool = False,
    region_sampling: str = "official",
) -> DIFD:
    """DIFD composed from injected parts: the tiny encoder and 16-wide decoders."""
    torch.manual_seed(seed)
    model = tiny_difd(
        CHANNELS,
        reduce_dim=16,
        decoder_extra_maps=decoder_extra_maps,
        region_sampling=region_sampling,
        multi_shot=multi_shot,
    )
    return model.to(dtype).eval()


def make_mask(kind: str, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.zeros(height, width)
    if kind == "full":
        m[:] = 1
    elif kind == "tiny":  # 20 pixels
        m[30:34, 20:25] = 1
    elif kind == "border":  # touches the top and right edges
        m[: height // 3, width - width // 4 :] = 1
    elif kind == "blob":
        yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        m[((yy - height * 0.55) / (height * 0.3)) ** 2 + ((xx - width * 0.45) / (width * 0.25)) ** 2 <= 1] = 1
    elif kind == "big":
        m[2:-2, 3:-3] = 1
    elif kind == "scatter":
        m = (torch.rand(height, width, generator=gen) < 0.3).float()
    elif kind == "bottom_strip":  # only rows no SI window covers (H % 8 != 0): pixel fallback, > 100 px
        m[height - height % 8 + 2 :, :] = 1
    elif kind == "bottom_corner":  # same, ≤ 100 px
        m[height - height % 8 + 2 :, :20] = 1
    elif kind != "empty":
        raise ValueError(kind)
    return m


def make_inputs(kinds, q: int, height: int, width: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b, s = len(kinds), len(kinds[0])
    supp = torch.randn(b, s, 3, height, width, generator=gen, dtype=dtype)
    qry = torch.randn(b, q, 3, height, width, generator=gen, dtype=dtype)
    masks = torch.stack([torch.stack([make_mask(k, height, width, gen) for k in ep]) for ep in kinds]).to(
        dtype
    )
    return supp, masks, qry


def compare(model, supp, masks, qry, tol, multi_shot="official", extra=False, seed=OFFICIAL_SEED):
    out = model(supp, masks, qry, align=True)
    ref_q, ref_s = naive_forward(model, supp, masks, qry, True, multi_shot, extra, seed)
    torch.testing.assert_close(out.query_probs, ref_q, **tol)
    expected_valid = torch.tensor([p is not None for p in ref_s])
    assert torch.equal(out.align_valid, expected_valid)
    for e, ref in enumerate(ref_s):
        if ref is not None:
            torch.testing.assert_close(out.support_probs[e], ref, **tol)
    return out, ref_q, ref_s


CASES = [
    # (mask kinds per episode and shot, Q, H, W, multi_shot, extra maps)
    ([["full"]], 1, 64, 64, "official", False),
    ([["tiny"]], 1, 64, 64, "official", True),
    ([["empty"]], 1, 64, 64, "official", False),
    ([["border"]], 4, 64, 64, "official", False),
    ([["blob", "empty", "tiny"], ["border", "full", "scatter"]], 4, 64, 64, "official", True),
    ([["empty", "blob", "tiny"]], 1, 64, 64, "official", False),  # shot 0 empty, episode not: SI fg on
    ([["scatter"], ["empty"]], 4, 64, 64, "official", False),
    ([["blob", "tiny", "border"], ["empty", "empty", "empty"]], 1, 64, 64, "all", True),
    ([["border", "scatter", "empty"]], 2, 64, 64, "all", False),
    ([["bottom_strip"], ["bottom_corner"]], 1, 70, 70, "official", False),  # pixel fallback
    ([["big"]], 1, 136, 136, "official", False),  # > 150 fg and > 250 bg windows: sub-sampling
    ([["blob"]], 1, 48, 64, "official", True),  # non-square: clipped boxes
]


@pytest.mark.parametrize(("kinds", "q", "height", "width", "multi_shot", "extra"), CASES)
def test_fast_matches_naive(kinds, q, height, width, multi_shot, extra):
    model = tiny_model(multi_shot=multi_shot, decoder_extra_maps=extra)
    supp, masks, qry = make_inputs(kinds, q, height, width)
    out, _, _ = compare(model, supp, masks, qry, F64_TOL, multi_shot, extra)
    assert bool(out.align_valid.all()), "the alignment pass must run in these cases to be compared"


def test_fast_matches_naive_float32():
    model = tiny_model(torch.float32)
    supp, masks, qry = make_inputs([["blob"], ["tiny"]], 2, 64, 64, torch.float32)
    out = model(supp, masks, qry, align=False)
    ref_q, _ = naive_forward(model, supp, masks, qry, False)
    torch.testing.assert_close(out.query_probs, ref_q, **F32_TOL)


def test_skipped_alignment_matches_naive():
    """With these weights (seed 0) the predicted query mask is empty: the episode is skipped by both."""
    model = tiny_model(seed=0)
    supp, masks, qry = make_inputs([["full"]], 1, 64, 64)
    out, _, ref_s = compare(model, supp, masks, qry, F64_TOL)
    assert ref_s == [None] and not bool(out.align_valid.any())


def test_random_region_sampling_matches_naive_with_drawn_seed():
    model = tiny_model(region_sampling="random")
    supp, masks, qry = make_inputs([["blob"]], 1, 64, 64)
    torch.manual_seed(123)
    seed = int(torch.randint(2**31 - 1, (1,)))
    torch.manual_seed(123)
    out = model(supp, masks, qry, align=False)
    ref_q, _ = naive_forward(model, supp, masks, qry, False, seed=seed)
    torch.testing.assert_close(out.query_probs, ref_q, **F64_TOL)
    other = model(supp, masks, qry, align=False)  # fresh draws: different boxes
    assert not torch.allclose(other.query_probs, out.query_probs)


def test_official_draws_equal_global_reseeding():
    """The local generators reproduce what re-seeding the global RNGs with 9 (the official code) gives."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        ratio = torch.rand(100) * 1.5 + 0.5
    local = torch.Generator().manual_seed(9)
    assert torch.equal(ratio, torch.rand(100, generator=local) * 1.5 + 0.5)
    boxes = draw_boxes(256, 256, OFFICIAL_SEED)
    naive = naive_boxes(256, 256, OFFICIAL_SEED)
    assert [tuple(int(t[i]) for t in boxes) for i in range(100)] == [b[:4] for b in naive]
    assert all(int(r1) <= 256 and int(c1) <= 256 for _, r1, _, c1 in zip(*boxes, strict=True))

    state = random.getstate()
    try:
        random.seed(9)
        fg = random.sample(range(400), 150)
        bg = random.sample(range(900), 250)
        random.seed(9)
        px = random.sample(range(5000), 100)
    finally:
        random.setstate(state)
    assert subsample_plan(True, 400, 1000, 900, 9000, 9) == ("window", tuple(fg), "window", tuple(bg))
    assert subsample_plan(True, 0, 5000, 10, 9000, 9)[:2] == ("pixel", tuple(px))


def test_forward_leaves_global_rng_untouched():
    model = tiny_model()
    supp, masks, qry = make_inputs([["scatter"]], 1, 136, 136)  # with SI sub-sampling
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()  # noqa: NPY002
    model(supp, masks, qry, align=True)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_batch_of_queries_equals_one_at_a_time():
    model = tiny_model()
    supp, masks, qry = make_inputs([["blob", "tiny", "full"], ["border", "empty", "scatter"]], 4, 64, 64)
    batched = model(supp, masks, qry, align=False).query_probs
    single = torch.cat([model(supp, masks, qry[:, j : j + 1], align=False).query_probs for j in range(4)], 1)
    torch.testing.assert_close(batched, single, atol=1e-12, rtol=1e-10)
    per_episode = torch.cat(
        [model(supp[e : e + 1], masks[e : e + 1], qry[e : e + 1], align=False).query_probs for e in range(2)]
    )
    torch.testing.assert_close(batched, per_episode, atol=1e-12, rtol=1e-10)


def test_gradients_reach_every_parameter():
    model = tiny_model().train()
    supp, masks, qry = make_inputs([["blob"], ["border"]], 2, 64, 64)
    labels = make_inputs([["tiny", "blob"]], 1, 64, 64)[1][0].long().expand(2, 2, 64, 64)
    out = model(supp, masks, qry)
    DIFDLoss()(out, labels, masks)["total"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_losses_match_naive():
    model = tiny_model()
    supp, masks, qry = make_inputs([["blob", "tiny"], ["border", "scatter"]], 2, 64, 64)
    labels = make_inputs([["tiny", "blob"], ["border", "full"]], 1, 64, 64)[1].long()
    labels[0, 0, :3] = 255
    out = model(supp, masks, qry, align=True)
    ref_q, ref_s = naive_forward(model, supp, masks, qry, True)
    got = DIFDLoss()(out, labels, masks)
    # The naive boundary loss has no ignore index; compare it where no label is 255.
    ref = naive_losses(ref_q, ref_s, labels.clamp(max=1), masks)
    for name in ("align_nll", "align_boundary"):
        torch.testing.assert_close(got[name], ref[name], **F64_TOL)
    nll = torch.nn.functional.nll_loss(
        torch.log(
            ref_q.flatten(0, 1).clamp(torch.finfo(torch.float32).eps, 1 - torch.finfo(torch.float32).eps)
        ),
        labels.flatten(0, 1),
        weight=torch.tensor([0.1, 1.0], dtype=torch.float64),
        ignore_index=255,
    )
    torch.testing.assert_close(got["query_nll"], nll, **F64_TOL)
    clean = labels.clamp(max=1)
    clean_terms = DIFDLoss()(out, clean, masks)
    torch.testing.assert_close(clean_terms["query_boundary"], ref["query_boundary"], **F64_TOL)
    torch.testing.assert_close(clean_terms["total"], ref["total"], **F64_TOL)


def test_loss_weights_switch_terms_off_and_skip_invalid_episodes():
    b, s, q, h, w = 2, 2, 1, 32, 32
    gen = torch.Generator().manual_seed(3)
    query_probs = torch.softmax(torch.randn(b, q, 2, h, w, generator=gen), 2)
    support_probs = torch.softmax(torch.randn(b, s, 2, h, w, generator=gen), 2)
    labels = (torch.rand(b, q, h, w, generator=gen) > 0.5).long()
    masks = (torch.rand(b, s, h, w, generator=gen) > 0.5).float()
    valid = torch.tensor([True, False])
    out = DIFDOutput(query_probs, support_probs, valid)
    full = DIFDLoss()(out, labels, masks)
    only_valid = DIFDLoss()(DIFDOutput(query_probs[:1], support_probs[:1], valid[:1]), labels[:1], masks[:1])
    torch.testing.assert_close(
        full["align_nll"], only_valid["align_nll"] / 2
    )  # skipped episode counts as zero
    torch.testing.assert_close(full["align_boundary"], only_valid["align_boundary"] / 2)
    off = DIFDLoss(query_nll=0.0, align_nll=0.0)(out, labels, masks)
    torch.testing.assert_close(off["total"], full["query_boundary"] + full["align_boundary"])
    no_align = DIFDLoss(align_nll=0.0, align_boundary=0.0)(out, labels, masks)
    assert float(no_align["align_nll"]) == 0.0
    torch.testing.assert_close(no_align["total"], full["query_nll"] + full["query_boundary"])
    eval_out = DIFDLoss()(DIFDOutput(query_probs), labels, masks)
    torch.testing.assert_close(eval_out["total"], full["query_nll"] + full["query_boundary"])
    with pytest.raises(ValueError, match="qry_labels"):
        DIFDLoss()(out, labels[:, :, :-1], masks)
    with pytest.raises(ValueError, match="weight"):
        DIFDLoss(query_nll=-1.0)


def _bad_inputs():
    supp, masks, qry = make_inputs([["blob", "tiny"]], 1, 32, 32)
    nonbinary = masks.clone()
    nonbinary[0, 0, 0, 0] = 0.5
    return [
        ("supp_imgs", (supp[0], masks, qry)),
        ("qry_imgs", (supp, masks, qry[0])),
        ("supp_masks", (supp, masks[0], qry)),
        ("S ≥ 1", (supp[:, :0], masks[:, :0], qry)),
        ("Q ≥ 1", (supp, masks, qry[:, :0])),
        ("B ≥ 1", (supp[:0], masks[:0], qry[:0])),
        ("to match", (supp, masks, torch.cat([qry, qry]))),
        ("equal sizes", (supp, masks, qry[..., :16])),
        ("3 channels", (supp[:, :, :1], masks, qry[:, :, :1])),
        ("supp_masks: expected shape", (supp, masks[..., :16], qry)),
        ("supp_masks: expected values", (supp, nonbinary, qry)),
        ("floating point", (supp.long(), masks, qry.long())),
    ]


@pytest.mark.parametrize(("message", "args"), _bad_inputs(), ids=[m for m, _ in _bad_inputs()])
def test_bad_inputs_raise(message, args):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(*args)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="region_sampling"):
        tiny_model(region_sampling="fresh")
    with pytest.raises(ValueError, match="multi_shot"):
        tiny_model(multi_shot="mean")


def test_build_difd_with_injected_encoder():
    """``build_difd(encoder=...)`` takes any encoder with 512-channel features (the contract)."""
    model = build_difd(encoder=TinyEncoder(512)).eval()
    supp, masks, qry = make_inputs([["blob"]], 2, 32, 32, torch.float32)
    out = model(supp, masks, qry)
    assert out.query_probs.shape == (1, 2, 2, 32, 32) and out.support_probs is None
    torch.testing.assert_close(out.query_probs.sum(2), torch.ones(1, 2, 32, 32))
    assert {"fuse.weight", "decoder1.merge.0.weight", "decoder2.cls.3.weight"} <= set(model.state_dict())


def test_bilinear_weights_and_masked_sum_match_interpolate():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 13, generator=gen, dtype=torch.float64)
    up = nn.functional.interpolate(x, size=(37, 50), mode="bilinear", align_corners=True)
    u_h, u_w = bilinear_weights(37, 9, x.device), bilinear_weights(50, 13, x.device)
    torch.testing.assert_close(u_h @ x @ u_w.t(), up, **F64_TOL)
    masks = (torch.rand(2, 37, 50, generator=gen) > 0.5).double()
    torch.testing.assert_close(masked_sum(x, masks), (up * masks.unsqueeze(1)).sum((2, 3)), **F64_TOL)


def test_pixel_fallback_when_no_window_covers_the_mask():
    """70×70: SI windows stop at row 64, so a mask below it falls back to (at most 100) pixel features."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.stack([make_mask(k, 70, 70, gen) for k in ("bottom_strip", "bottom_corner")]).double()
    feats = torch.randn(2, 4, 17, 17, generator=gen, dtype=torch.float64)
    sets = DualInterspersion()(feats, masks, torch.tensor([True, True]))
    n_si = sets.fg_valid.sum(1) - 1 - sets.fg_valid[:, -100:].sum(1)
    assert n_si.tolist() == [100, 80]  # 280 pixels sampled down to 100; 80 pixels kept
