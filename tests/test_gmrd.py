"""GMRD (models/gmrd.py) against its naive port (tests/naive_gmrd.py): probabilities, alignment and loss
terms in float64 and float32 with the same descriptor draws, a float64 training step, the pieces (fill
rule, edge masks against OpenCV), official-layout checkpoints, refusal across methods, and ``train.py`` /
``test.py`` end to end with ``method=gmrd``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models.gmrd as gmrd
from models import load_model
from models.builder import build_difd
from models.gmrd import GMRDLoss, edge_masks, fill_index, fill_order
from models.gmrd_builder import build_gmrd
from tests.naive_gmrd import naive_forward, naive_query_loss
from tests.run_fixtures import make_mini_root
from tests.tiny_difd import TinyEncoder

REPO = Path(__file__).resolve().parent.parent
F64 = {"atol": 1e-9, "rtol": 1e-7}
F32 = {"atol": 1e-5, "rtol": 1e-4}
SIZE = 64


def tiny_gmrd(dtype=torch.float64, seed: int = 0, edge: str = "official", dropout: bool = False):
    torch.manual_seed(seed)
    model = build_gmrd(mlp_size=SIZE, edge_masks=edge, encoder=TinyEncoder(8), fg_descriptors=6,
                       bg_descriptors=10)  # fmt: skip
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout | torch.nn.Dropout2d) and not dropout:
            module.p = 0.0  # dropout draws are not shared with the naive port
    return model.to(dtype)


def make_inputs(kinds, dtype=torch.float64, seed: int = 1):
    """``kinds[b][s]``: 'blob', 'tiny', 'empty', 'border' or 'full' support masks."""
    gen = torch.Generator().manual_seed(seed)
    b, s = len(kinds), len(kinds[0])
    supp = torch.randn(b, s, 3, SIZE, SIZE, generator=gen, dtype=dtype)
    qry = torch.randn(b, 1, 3, SIZE, SIZE, generator=gen, dtype=dtype)
    masks = torch.zeros(b, s, SIZE, SIZE, dtype=dtype)
    boxes = {
        "blob": (10, 40, 20, 50),
        "tiny": (30, 33, 30, 32),
        "border": (0, 20, 44, 64),
        "full": (0, 64, 0, 64),
    }
    for e, episode in enumerate(kinds):
        for k, kind in enumerate(episode):
            if kind != "empty":
                r0, r1, c0, c1 = boxes[kind]
                masks[e, k, r0:r1, c0:c1] = 1
    return supp, masks, qry


class Recorder:
    """Records the fast model's draws (:func:`models.gmrd.fill_order`) and serves them to the naive port
    as the official ``random.sample`` calls they stand for."""

    def __init__(self, s: int) -> None:
        self.s = s
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, region):
        order = fill_order(region)
        self.calls.append((region, order))
        return order

    def sample(self, key, n_in, k):
        phase, e, shot, part = key
        call = {("support", "fg"): 0, ("support", "bg"): 1, ("align", "fg"): 2, ("align", "bg"): 3}[
            phase, part
        ]
        region, order = self.calls[call]
        row = e * self.s + shot
        ranks = region[row].long().cumsum(0) - 1
        assert int(region[row].sum()) == n_in
        return ranks[order[row, :k]].tolist()


def run_both(model, supp, masks, qry, monkeypatch):
    recorder = Recorder(supp.shape[1])
    monkeypatch.setattr(gmrd, "fill_order", recorder)
    out = model(supp, masks, qry, align=True)
    ref = naive_forward(model, supp, masks, qry, True, recorder.sample)
    return out, ref


CASES = [
    [["blob"]],
    [["border"]],
    [["tiny"]],
    [["full"]],  # no background: zero-filled background descriptors
    [["empty"]],  # the fallback
    [["blob", "tiny", "empty"], ["empty", "empty", "empty"], ["border", "blob", "full"]],
]


@pytest.mark.parametrize("kinds", CASES)
@pytest.mark.parametrize("edge", ["official", "paper"])
def test_fast_matches_naive(kinds, edge, monkeypatch):
    model = tiny_gmrd(edge=edge)
    supp, masks, qry = make_inputs(kinds)
    out, (ref_q, ref_align, ref_s) = run_both(model, supp, masks, qry, monkeypatch)
    torch.testing.assert_close(out.query_probs[:, 0], ref_q, **F64)
    assert out.align_valid.tolist() == [p is not None for p in ref_s]
    for e, ref in enumerate(ref_s):
        if ref is not None:
            torch.testing.assert_close(out.support_probs[e], ref, **F64)
    labels = (torch.rand(len(kinds), 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) > 0.7).long()
    labels[..., :3, :] = 255
    terms = GMRDLoss()(out, labels, masks)
    torch.testing.assert_close(terms["query_nll"], naive_query_loss(ref_q, labels[:, 0]), **F64)
    torch.testing.assert_close(terms["align_nll"], ref_align, **F64)


def test_fast_matches_naive_float32(monkeypatch):
    model = tiny_gmrd(torch.float32)
    supp, masks, qry = make_inputs([["blob", "border"], ["tiny", "blob"]], torch.float32)
    out, (ref_q, ref_align, _) = run_both(model, supp, masks, qry, monkeypatch)
    torch.testing.assert_close(out.query_probs[:, 0], ref_q, **F32)
    torch.testing.assert_close(
        GMRDLoss()(out, ref_q.argmax(1)[:, None], masks)["align_nll"], ref_align, **F32
    )


def test_float64_training_step_matches_naive(monkeypatch):
    """One SGD step (momentum, weight decay) from the same state on the total loss: same parameters after."""
    fast = tiny_gmrd()
    naive = tiny_gmrd()
    fast.train()
    naive.train()
    supp, masks, qry = make_inputs([["blob"], ["border"]])
    labels = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.long)
    labels[:, :, 15:45, 15:45] = 1
    recorder = Recorder(1)
    monkeypatch.setattr(gmrd, "fill_order", recorder)
    opts = {"lr": 1e-2, "momentum": 0.9, "weight_decay": 5e-4}
    opt_fast = torch.optim.SGD(fast.parameters(), **opts)
    opt_naive = torch.optim.SGD(naive.parameters(), **opts)
    terms = GMRDLoss()(fast(supp, masks, qry), labels, masks)
    probs, align, _ = naive_forward(naive, supp, masks, qry, True, recorder.sample)
    naive_total = naive_query_loss(probs, labels[:, 0]) + align
    torch.testing.assert_close(terms["total"], naive_total, **F64)
    terms["total"].backward()
    naive_total.backward()
    opt_fast.step()
    opt_naive.step()
    for (name, a), b in zip(fast.named_parameters(), naive.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=name)
    # No episode took the fallback, so the threshold head got no gradient (SGD skipped it), as official.
    assert fast.encoder.head.weight.grad is None


def test_fill_index_follows_the_official_rule():
    gen = torch.Generator().manual_seed(0)
    for n_in in (0, 1, 3, 7, 10, 13):
        region = torch.zeros(1, 20, dtype=torch.bool)
        region[0, torch.randperm(20, generator=gen)[:n_in]] = True
        order = fill_order(region)
        index, keep = fill_index(region, order)
        inside = region[0].nonzero().flatten().tolist()
        outside = (~region[0]).nonzero().flatten().tolist()
        drawn = order[0, : len(outside) if n_in >= len(outside) else len(outside) % max(n_in, 1)].tolist()
        expected = drawn if n_in >= len(outside) else drawn + inside * (len(outside) // max(n_in, 1))
        assert sorted(order[0, :n_in].tolist()) == inside
        if n_in == 0:
            assert not keep.any()
            continue
        assert keep.all()
        assert index[0, inside].tolist() == inside
        assert index[0, outside].tolist() == expected


def test_edge_masks_equal_opencv():
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 32, 32, generator=gen) > 0.4).double()
    masks[1] = 0
    masks[1, 0:9, 20:32] = 1  # touches the border
    kernel = np.ones((3, 3), dtype=np.uint8)
    inner, outer = edge_masks(masks, "official")
    _, paper = edge_masks(masks, "paper")
    for m, i, o, p in zip(masks.numpy(), inner, outer, paper, strict=True):
        np.testing.assert_array_equal(i.numpy(), m - cv2.erode(m, kernel, iterations=2))
        np.testing.assert_array_equal(o.numpy(), cv2.dilate(1 - m, kernel, iterations=2) - m)
        np.testing.assert_array_equal(p.numpy(), cv2.dilate(m, kernel, iterations=2) - m)


def test_encoded_support_equals_forward(monkeypatch):
    model = tiny_gmrd().eval()
    supp, masks, qry = make_inputs([["blob", "tiny"], ["empty", "empty"]])
    torch.manual_seed(5)
    probs = model(supp, masks, qry).query_probs
    torch.manual_seed(5)
    support = model.encode_support(supp, masks)
    feats, t = model.encode_queries(qry.flatten(0, 1))
    again = model.segment_encoded(support, feats.unflatten(0, (2, 1)), t.view(2, 1))
    torch.testing.assert_close(again, probs, **F64)
    one = model.segment_encoded(support.episode(1), feats[1:].unsqueeze(0), t[1:].view(1, 1))
    torch.testing.assert_close(one, probs[1:], **F64)


def test_bad_sizes_and_options_are_refused():
    model = tiny_gmrd()
    supp, masks, qry = make_inputs([["blob"]])
    with pytest.raises(ValueError, match=r"take 64x64 slices \(mlp_size=64\), got 32x32"):
        model(supp[..., :32, :32], masks[..., :32, :32], qry[..., :32, :32])
    with pytest.raises(ValueError, match=r"edge_masks: expected one of \('official', 'paper'\), got 'x'"):
        build_gmrd(mlp_size=8, edge_masks="x", encoder=TinyEncoder(4), fg_descriptors=2, bg_descriptors=2)


# ------------------------------------------------------------------ official-layout checkpoints
def official_state(mlp_size: int = 64) -> dict[str, torch.Tensor]:
    """A state dict with the official ``FewShotSeg``'s keys and shapes (the official module tree: the
    ResNet-101 encoder, ``mlp1``/``mlp2`` of 100/600 descriptors, ``decoder1``/``decoder2``), random
    values (BatchNorm variances positive)."""
    with torch.device("meta"):
        skeleton = build_gmrd(mlp_size=mlp_size).state_dict()
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in skeleton.items():
        if key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif value.is_floating_point():
            state[key] = torch.randn(value.shape, generator=gen) * 0.02
        else:
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    return state


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gmrd") / "official.pth"
    torch.save(official_state(), path)
    return path


def test_official_layout_loads_and_predicts(official_file):
    model, checkpoint = load_model(official_file)
    assert checkpoint.built_method == "gmrd" and checkpoint.built_options["mlp_size"] == 64
    state = torch.load(official_file)
    expected = {k for k in state if k.startswith(("mlp1.", "mlp2.", "decoder1.", "decoder2."))}
    assert expected == {
        f"{m}.reduce.{i}.{p}" for m in ("mlp1", "mlp2") for i in (0, 2) for p in ("weight", "bias")
    } | {f"decoder{d}.{n}.weight" for d in (1, 2) for n in ("res1.0", "res2.0", "res2.2", "down.0", "down.3")}
    # The loaded model predicts with the file's weights: a second build from the same state agrees.
    reference = build_gmrd(mlp_size=64)
    reference.load_state_dict(state)
    model.eval()
    reference.eval()
    supp, masks, qry = make_inputs([["blob"]], torch.float32)
    with torch.no_grad():
        torch.manual_seed(2)
        a = model(supp, masks, qry).query_probs
        torch.manual_seed(2)
        b = reference(supp, masks, qry).query_probs
    assert bool(torch.isfinite(a).all())
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_checkpoints_are_refused_across_gmrd_and_difd(official_file, tmp_path):
    with pytest.raises(ValueError, match=r"holds the weights of 'gmrd', not of 'difd'"):
        load_model(official_file, "difd")
    with torch.device("meta"):
        skeleton = build_difd().state_dict()
    difd = tmp_path / "difd.pth"
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in skeleton.items()}, difd)
    with pytest.raises(ValueError, match=r"holds the weights of 'difd', not of 'gmrd'"):
        load_model(difd, "gmrd")
    assert load_model(difd)[1].built_method == "difd"


# ------------------------------------------------------------------------------- end to end
def _run(script: str, *overrides: str) -> None:
    command = [sys.executable, str(REPO / script), "with", "debug", "method=gmrd", *overrides]
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")


@pytest.mark.e2e
def test_train_and_test_run_end_to_end(data_root, tmp_path):
    import json

    root = make_mini_root(data_root, tmp_path / "data")
    common = (f"data_root={root}", "eval_fold=1", f"path.log_dir={tmp_path}")
    _run("train.py", *common, "n_steps=2")
    fold = tmp_path / "gmrd_CHAOST2_setting1" / "fold1"
    metrics = json.loads((fold / "train" / "1" / "metrics.json").read_text())
    assert {"query_nll", "align_nll", "total"} <= set(metrics) and "query_boundary" not in metrics
    _run("test.py", *common, "test_label=[2]")
    results = json.loads((fold / "test" / "1" / "results.json").read_text())
    assert results["method"] == "gmrd" and 0.0 <= results["classes"]["RK"]["mean_dice"] <= 1.0
