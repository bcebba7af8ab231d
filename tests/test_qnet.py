"""Q-Net (models/qnet.py) against the naive port of its official code (tests/naive_qnet.py): probabilities,
loss terms and a float64 training step with a small injected encoder at 64 px, the test-time refinement
(also under inference mode), the support-once path, official-layout checkpoints with the real ResNet-101
encoder, refusal across methods, its config keys, and train.py / test.py end to end on CHAOST2."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from models import load_model
from models.encoder import Res101Encoder
from models.qnet import QNetLoss, build_qnet
from tests.naive_qnet import TinyLevels, naive_forward, naive_query_loss
from tests.official_tree import OfficialDIFD, OfficialEncoder
from tests.run_fixtures import make_mini_root

REPO = Path(__file__).resolve().parent.parent
SIZE = 64
F64 = {"atol": 1e-12, "rtol": 1e-10}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def episode(b=2, s=1, q=1, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    supp = torch.randn(b, s, 3, SIZE, SIZE, generator=gen, dtype=dtype)
    qry = torch.randn(b, q, 3, SIZE, SIZE, generator=gen, dtype=dtype)
    masks = torch.zeros(b, s, SIZE, SIZE, dtype=dtype)
    labels = torch.zeros(b, q, SIZE, SIZE, dtype=torch.long)
    for i in range(b):
        top, left = 8 + 5 * i, 12 + 3 * i
        masks[i, :, top : top + 30, left : left + 26] = 1
        labels[i, :, top + 2 : top + 28, left : left + 30] = 1
    labels[:, :, :2] = 255
    return supp, masks, qry, labels


def tiny_qnet(dtype=torch.float64, seed=0, **options):
    torch.manual_seed(seed)
    return build_qnet(encoder=TinyLevels(), **options).to(dtype)


@pytest.mark.parametrize(("s", "q"), [(1, 1), (2, 1), (2, 3)])
def test_training_forward_and_losses_match_naive(s, q):
    model = tiny_qnet().train()
    supp, masks, qry, labels = episode(s=s, q=q)
    out = model(supp, masks, qry)
    terms = QNetLoss()(out, labels, masks)
    probs, align = naive_forward(copy.deepcopy(model.encoder), supp, masks, qry, train=True)
    torch.testing.assert_close(out.query_probs, probs, **F64)
    torch.testing.assert_close(terms["query_nll"], naive_query_loss(probs, labels), **F64)
    torch.testing.assert_close(terms["align_nll"], align, **F64)
    assert out.align_valid.all() and terms["align_nll"] > 0
    torch.testing.assert_close(terms["total"], terms["query_nll"] + terms["align_nll"], **F64)


def test_empty_predicted_mask_skips_the_episodes_alignment():
    model = tiny_qnet().train()
    supp, masks, qry, labels = episode()
    with torch.no_grad():
        model.encoder.head.bias.fill_(-1e3)  # threshold far below every score: nothing predicted foreground
    out = model(supp, masks, qry)
    _, align = naive_forward(model.encoder, supp, masks, qry, train=True)
    assert not out.align_valid.any() and align == 0
    assert QNetLoss()(out, labels, masks)["align_nll"] == 0


@pytest.mark.parametrize(("s", "q", "iters"), [(1, 1, 7), (2, 2, 3)])
def test_eval_forward_with_refinement_matches_naive(s, q, iters):
    model = tiny_qnet(refine_iters=iters, refine_lr=0.02).eval()
    supp, masks, qry, _ = episode(s=s, q=q, seed=1)
    with torch.no_grad():
        probs, _ = naive_forward(model.encoder, supp, masks, qry, train=False, n_iters=iters, lr=0.02)
        unrefined, _ = naive_forward(model.encoder, supp, masks, qry, train=False)
        fast = model(supp, masks, qry).query_probs
    with torch.inference_mode():  # how the harness evaluates
        inference = model(supp, masks, qry).query_probs
    torch.testing.assert_close(fast, probs, **F64)
    torch.testing.assert_close(inference, probs, **F64)
    assert (probs - unrefined).abs().max() > 1e-3  # the refinement changes the prediction
    model.refine_iters = 0
    with torch.no_grad():
        torch.testing.assert_close(model(supp, masks, qry).query_probs, unrefined, **F64)


def test_float32_matches_naive():
    model = tiny_qnet(torch.float32, refine_iters=7).train()
    supp, masks, qry, labels = episode(s=2, dtype=torch.float32, seed=2)
    out = model(supp, masks, qry)
    terms = QNetLoss()(out, labels, masks)
    probs, align = naive_forward(model.encoder, supp, masks, qry, train=True)
    torch.testing.assert_close(out.query_probs, probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["align_nll"], align, atol=1e-5, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        probs, _ = naive_forward(model.encoder, supp, masks, qry, train=False, n_iters=7)
        torch.testing.assert_close(model(supp, masks, qry).query_probs, probs, atol=1e-4, rtol=1e-4)


def test_float64_training_step_matches_naive():
    """One SGD step (the official optimiser settings) from the same state: every parameter to 1e-6."""
    model = tiny_qnet().train()
    encoder = copy.deepcopy(model.encoder)
    supp, masks, qry, labels = episode(s=2, seed=3)
    settings = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}
    fast_opt = torch.optim.SGD(model.parameters(), **settings)
    naive_opt = torch.optim.SGD(encoder.parameters(), **settings)
    for _ in range(2):  # the second step also exercises the momentum
        out = model(supp, masks, qry)
        QNetLoss()(out, labels, masks)["total"].backward()
        fast_opt.step()
        fast_opt.zero_grad()
        probs, align = naive_forward(encoder, supp, masks, qry, train=True)
        (naive_query_loss(probs, labels) + align).backward()
        naive_opt.step()
        naive_opt.zero_grad()
    for (name, value), other in zip(
        model.encoder.state_dict().items(), encoder.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, other, atol=1e-6, rtol=0, msg=name)
    start = tiny_qnet().parameters()
    assert any((p - q).abs().max() > 1e-6 for p, q in zip(model.parameters(), start, strict=True))


def test_support_once_equals_forward():
    model = tiny_qnet(refine_iters=2).eval()
    supp, masks, qry, _ = episode(b=2, s=2, q=2, seed=4)
    with torch.no_grad():
        whole = model(supp, masks, qry).query_probs
        support = model.encode_support(supp, masks)
        queries = model.encode_queries(qry.flatten(0, 1))
        parts = model.segment_encoded(support, *(x.unflatten(0, (2, 2)) for x in queries))
        one = model.segment_encoded(support.episode(1), *(x.unflatten(0, (2, 2))[1:] for x in queries))
    torch.testing.assert_close(parts, whole, **F64)
    torch.testing.assert_close(one, whole[1:], **F64)


def test_bad_inputs_raise():
    model = tiny_qnet()
    supp, masks, qry, _ = episode()
    with pytest.raises(ValueError, match=r"supp_masks: expected values in \{0, 1\}"):
        model(supp, masks * 2, qry)
    with pytest.raises(ValueError, match=r"qry_imgs: expected \(B, Q, 3, H, W\)"):
        model(supp, masks, qry[:, 0])


# ------------------------------------------------------------------ checkpoints, real ResNet-101 encoder
class OfficialQNet(nn.Module):
    """The official ``FewShotSeg`` module tree: the encoder, and an unweighted ``NLLLoss`` (no buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = OfficialEncoder()
        self.criterion = nn.NLLLoss()


def _meta_state(tree: type[nn.Module]) -> dict[str, torch.Tensor]:
    """Real names and shapes, one stored element per tensor (kilobytes on disk)."""
    with torch.device("meta"):
        state = tree().state_dict()
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in state.items()}


def test_official_checkpoint_loads_and_predicts_as_official(tmp_path):
    torch.manual_seed(5)
    official = OfficialQNet()
    for module in official.modules():  # non-trivial BatchNorm statistics, as a trained model has
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "qnet_official.pth"
    torch.save(official.state_dict(), path)
    model, checkpoint = load_model(path, options={"refine_iters": 2})
    assert model.method == "qnet" and checkpoint.built_method == "qnet" and checkpoint.dropped == []
    assert checkpoint.built_options == {"alpha": 0.9, "refine_iters": 2, "refine_lr": 0.01}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        encoder = Res101Encoder(layer4_features=True)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in official.state_dict().items()})
    model.eval()
    encoder.eval()
    supp, masks, qry, _ = episode(b=1, dtype=torch.float32, seed=6)
    with torch.no_grad():
        probs, _ = naive_forward(encoder, supp, masks, qry, train=False, n_iters=2)
        torch.testing.assert_close(model(supp, masks, qry).query_probs, probs, atol=1e-4, rtol=1e-4)


def test_checkpoints_are_refused_across_difd_and_qnet(tmp_path):
    qnet, difd = tmp_path / "qnet.pth", tmp_path / "difd.pth"
    torch.save(_meta_state(OfficialQNet), qnet)
    torch.save(_meta_state(OfficialDIFD) | {"criterion.weight": torch.tensor([0.1, 1.0])}, difd)
    with pytest.raises(ValueError, match=r"qnet.pth holds the weights of 'qnet', not of 'difd'"):
        load_model(qnet, "difd")
    with pytest.raises(ValueError, match=r"difd.pth holds the weights of 'difd', not of 'qnet'"):
        load_model(difd, "qnet")
    assert load_model(difd)[1].built_method == "difd"
    assert load_model(qnet)[1].built_method == "qnet"


def _config(named=(), **updates):
    from config import ex

    return ex.run("print_run_root", named_configs=list(named), config_updates=updates).config


def test_qnet_config_keys_and_official_script():
    config = _config(["official_script"], method="qnet")
    assert (config["seed"], config["n_steps"], config["lr_step_gamma"], config["supp_idx"]) == (
        2021,
        30000,
        0.98,
        2,
    )
    assert (config["refine_iters"], config["refine_lr"], config["alpha"]) == (7, 0.01, 0.9)
    assert config["loss_weights"] == {"query_nll": 1.0, "align_nll": 1.0}
    with pytest.raises(ValueError, match=r"'refine_iters' \(a key of qnet, not of method=difd\)"):
        _config(refine_iters=3)
    with pytest.raises(ValueError, match=r"refine_iters: expected an int >= 0, got -1"):
        _config(method="qnet", refine_iters=-1)


# ------------------------------------------------------------------------------------------ end to end
def _run(script: str, *overrides: str) -> None:
    command = [sys.executable, str(REPO / script), "with", "debug", *overrides]
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")


@pytest.mark.e2e
def test_train_and_test_run_end_to_end(data_root, tmp_path):
    root = make_mini_root(data_root, tmp_path / "data")
    common = ("method=qnet", f"data_root={root}", "eval_fold=1", f"path.log_dir={tmp_path}")
    _run("train.py", *common)
    fold = tmp_path / "qnet_CHAOST2_setting1" / "fold1"
    metrics = json.loads((fold / "train" / "1" / "metrics.json").read_text())
    assert {"query_nll", "align_nll", "total"} <= set(metrics)
    _run("test.py", *common, "test_label=[2]", "refine_iters=2")
    results = json.loads((fold / "test" / "1" / "results.json").read_text())
    assert results["method"] == "qnet" and 0.0 <= results["classes"]["RK"]["mean_dice"] <= 1.0
