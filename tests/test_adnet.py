"""ADNet (models/adnet.py): the fast model against the naive port of the official forward and loss
(tests/naive_adnet.py), a float64 training step, official-layout checkpoints, refusal across methods, and
``train.py`` / ``test.py`` end to end with ``method=adnet``.

A tiny injected encoder (two strided convolutions with BatchNorm to 32 channels at H/8, so the batch
statistics of the joint support-query batch matter) keeps the cases fast; the ResNet-101 encoder runs in
the official-layout tests. Float64 comparisons use ``atol = 1e-9, rtol = 1e-7``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import get_method, load_model
from models.adnet import ADNet, ADNetLoss, build_adnet
from tests.naive_adnet import OfficialTree, naive_forward, naive_losses
from tests.run_fixtures import make_mini_root

REPO = Path(__file__).resolve().parent.parent
F64_TOL = {"atol": 1e-9, "rtol": 1e-7}
F32_TOL = {"atol": 2e-5, "rtol": 1e-4}
WEIGHTS = {"query_nll": 1.0, "align_nll": 1.0, "threshold": 1.0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyEncoder(nn.Module):
    """``(N, 3, H, W)`` → ``(N, 32, H/8, W/8)``, with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=4, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_model(dtype=torch.float64, seed: int = 1) -> ADNet:
    torch.manual_seed(seed)
    return build_adnet(encoder=TinyEncoder()).to(dtype)


def make_inputs(b: int, s: int, q: int, size: int = 64, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    supp = torch.randn(b, s, 3, size, size, generator=gen, dtype=dtype)
    qry = torch.randn(b, q, 3, size, size, generator=gen, dtype=dtype)
    masks = torch.zeros(b, s, size, size, dtype=dtype)
    for i in range(b):
        for j in range(s):
            r, c = torch.randint(0, size // 2, (2,), generator=gen).tolist()
            masks[i, j, r : r + size // 3, c : c + size // 4] = 1
    labels = torch.randint(0, 2, (b, q, size, size), generator=gen)
    labels[..., :3, :] = 255
    return supp, masks, qry, labels


def _fast(model, supp, masks, qry, labels):
    out = model(supp, masks, qry)
    return out, ADNetLoss(**WEIGHTS)(out, labels, masks)


def _naive(model, supp, masks, qry, labels):
    probs, align = naive_forward(model.encoder, model.t, supp, masks, qry, model.training)
    return probs, naive_losses(probs, align, model.t, labels)


@pytest.mark.parametrize(("b", "s", "q"), [(1, 1, 1), (2, 1, 2), (2, 3, 1), (3, 2, 3)])
def test_fast_matches_naive_float64(b, s, q):
    model = tiny_model().train()
    supp, masks, qry, labels = make_inputs(b, s, q)
    # A threshold that leaves part of the query foreground, so that the alignment has something to pool.
    with torch.no_grad():
        model.t.fill_(-2.0)
    out, terms = _fast(model, supp, masks, qry, labels)
    ref_probs, ref_terms = _naive(model, supp, masks, qry, labels)
    torch.testing.assert_close(out.query_probs, ref_probs, **F64_TOL)
    assert out.align_valid.any()
    for name, value in ref_terms.items():
        torch.testing.assert_close(terms[name], value.reshape(()), **F64_TOL, msg=name)


def test_fast_matches_naive_float32_eval():
    model = tiny_model(torch.float32).eval()
    supp, masks, qry, labels = make_inputs(2, 2, 2, dtype=torch.float32)
    out = model(supp, masks, qry)
    ref, _ = naive_forward(model.encoder, model.t, supp, masks, qry, False)
    assert out.support_probs is None
    torch.testing.assert_close(out.query_probs, ref, **F32_TOL)


def test_skipped_alignment_matches_naive():
    """With ``t`` far below every score no query pixel is foreground: every episode is skipped."""
    model = tiny_model().train()
    with torch.no_grad():
        model.t.fill_(-40.0)
    supp, masks, qry, labels = make_inputs(2, 1, 2)
    out, terms = _fast(model, supp, masks, qry, labels)
    _, ref_terms = _naive(model, supp, masks, qry, labels)
    assert not out.align_valid.any() and float(terms["align_nll"].detach()) == 0.0
    torch.testing.assert_close(terms["total"], ref_terms["total"].reshape(()), **F64_TOL)


def test_float64_training_step_matches_naive():
    """One SGD step (the official optimiser) from a shared state: every parameter and buffer agree."""
    fast = tiny_model().train()
    with torch.no_grad():
        fast.t.fill_(-2.0)
    naive = copy.deepcopy(fast)
    supp, masks, qry, labels = make_inputs(2, 2, 2)
    for model, run in ((fast, _fast), (naive, _naive)):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        _, terms = run(model, supp, masks, qry, labels)
        terms["total"].sum().backward()
        opt.step()
    after, ref = fast.state_dict(), naive.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in tiny_model().state_dict().items())
    for key, value in ref.items():
        torch.testing.assert_close(after[key], value, atol=1e-12, rtol=1e-9, msg=key)


def test_encoded_support_gives_the_forward_probabilities():
    model = tiny_model().eval()
    supp, masks, qry, _ = make_inputs(2, 2, 3)
    expected = model(supp, masks, qry).query_probs
    support = model.encode_support(supp, masks)
    (feats,) = model.encode_queries(qry.flatten(0, 1))
    torch.testing.assert_close(
        model.segment_encoded(support, feats.unflatten(0, (2, 3))), expected, **F64_TOL
    )
    one = model.segment_encoded(support.episode(1), feats.unflatten(0, (2, 3))[1:])
    torch.testing.assert_close(one, expected[1:], **F64_TOL)


def test_loss_weights_switch_terms_off():
    model = tiny_model().train()
    supp, masks, qry, labels = make_inputs(1, 1, 1)
    out = model(supp, masks, qry)
    terms = ADNetLoss(query_nll=1.0, align_nll=0.0, threshold=2.0)(out, labels, masks)
    assert float(terms["align_nll"].detach()) == 0.0
    torch.testing.assert_close(terms["total"], terms["query_nll"] + 2 * model.t[0] / 20)
    with pytest.raises(ValueError, match="weight threshold must be ≥ 0"):
        ADNetLoss(threshold=-1.0)


def test_bad_inputs_raise():
    model = tiny_model()
    supp, masks, qry, _ = make_inputs(1, 1, 1)
    with pytest.raises(ValueError, match="supp_masks: expected values in"):
        model(supp, masks * 2, qry)
    with pytest.raises(ValueError, match="qry_imgs: expected"):
        model(supp, masks, qry[0])


def test_official_script_is_adnets_schedule():
    from config import ex
    from train import lr_milestones

    config = ex.run(
        "print_run_root", config_updates={"method": "adnet"}, named_configs=["official_script"]
    ).config
    assert (config["seed"], config["n_steps"], config["lr_step_gamma"]) == (2021, 50000, 0.95)
    assert config["pretrained_weights"] == "resnet101" and config["loss_weights"] == WEIGHTS
    # main_train.py: MultiStepLR milestones (ii + 1) * 1000 for ii in range(steps // 1000 - 1).
    official = [(ii + 1) * 1000 for ii in range(50000 // 1000 - 1)]
    assert lr_milestones(config["n_steps"], config["max_iters_per_load"]) == official


# ---------------------------------------------------------------- the ResNet-101 encoder, official layout
@pytest.fixture(scope="module")
def official_tree() -> OfficialTree:
    torch.manual_seed(3)
    tree = OfficialTree()
    with torch.no_grad():  # trained-looking BatchNorm statistics and threshold
        for name, buf in tree.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.1)
        tree.t.fill_(-3.0)
    return tree.eval()


def test_official_checkpoint_loads_identified_and_predicts_the_same(tmp_path, official_tree):
    path = tmp_path / "model.pth"
    # The official main_train.py saves the state dict of its nn.DataParallel wrapper.
    torch.save({f"module.{k}": v for k, v in official_tree.state_dict().items()}, path)
    model, checkpoint = load_model(path)
    assert isinstance(model, ADNet) and checkpoint.built_method == "adnet" and checkpoint.kind == "state_dict"
    assert set(model.state_dict()) == set(official_tree.state_dict())
    model.eval()
    supp, masks, qry, _ = make_inputs(1, 1, 2, dtype=torch.float32)
    with torch.no_grad():
        fast = model(supp, masks, qry).query_probs
        ref, _ = naive_forward(official_tree.encoder, official_tree.t, supp, masks, qry, False)
    torch.testing.assert_close(fast, ref, **F32_TOL)
    assert set(model.unused_parameters) == {
        f"encoder.{n}" for n, _ in official_tree.encoder.named_parameters() if n.startswith("aspp")
    }

    with pytest.raises(ValueError, match=r"holds the weights of 'adnet', not of 'difd'"):
        load_model(path, "difd")


def test_difd_weights_are_refused_as_adnet(tmp_path):
    from models import build_difd

    with torch.device("meta"):
        keys = build_difd().state_dict()
    path = tmp_path / "difd.pth"
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in keys.items()}, path)
    with pytest.raises(ValueError, match=r"holds the weights of 'difd', not of 'adnet'"):
        load_model(path, "adnet")
    assert get_method("adnet").title == "ADNet"


# ------------------------------------------------------------------------------------------ end to end
def _run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / script), "with", "debug", "method=adnet", *overrides]
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


@pytest.mark.e2e
def test_train_and_test_run_with_method_adnet(data_root, tmp_path):
    root = make_mini_root(data_root, tmp_path / "data")
    common = (f"data_root={root}", "eval_fold=1", f"path.log_dir={tmp_path / 'runs'}")
    _run("train.py", *common, "n_steps=2", "max_iters_per_load=1", "save_snapshot_every=2")
    fold = tmp_path / "runs" / "adnet_CHAOST2_setting1" / "fold1"
    metrics = json.loads((fold / "train" / "1" / "metrics.json").read_text())
    assert {"query_nll", "align_nll", "threshold", "total"} <= set(metrics)
    _run("test.py", *common, "test_label=[2]")
    results = json.loads((fold / "test" / "1" / "results.json").read_text())
    assert results["method"] == "adnet" and 0.0 <= results["classes"]["RK"]["mean_dice"] <= 1.0
