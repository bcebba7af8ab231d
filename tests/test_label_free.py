"""The label-free validation (engine.label_free): fixed episodes of the held-out volumes, drawn without
reading a label, and their AUC and thresholded Dice."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloaders import TrainDataset, get_dataset_info
from engine.evaluation import monitoring
from engine.label_free import LABEL_FREE_SEED, auc, label_free_episodes, label_free_scores
from engine.metrics import dice_iou
from tests.loader_fixtures import SYN, make_root
from tests.tiny_difd import tiny_difd
from utils import capture_rng_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The AUC by its definition: over every (positive, negative) pair, 1 when the positive scores higher,
    one half on a tie."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    return float(np.mean(wins))


def test_auc_known_values_and_definition() -> None:
    labels = np.array([0, 0, 1, 1])
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert auc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert auc(np.full(4, 0.7), labels) == 0.5  # everything foreground: chance
    assert np.isnan(auc(np.array([0.1, 0.9]), np.array([1, 1])))
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, size=40) / 4  # many ties
        labels = rng.integers(0, 2, size=40)
        if 0 < labels.sum() < labels.size:
            assert auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cases 3, 11 (fold 0: held out) and 20, 104 (fold 0: training)."""
    return make_root(tmp_path_factory.mktemp("syn"))


def test_episodes_come_from_the_held_out_volumes_without_their_labels(syn_root: Path) -> None:
    folder = syn_root / SYN.name / SYN.image_folder
    for case_id in (3, 11):  # labels that cannot be read: drawing must not need them
        (folder / SYN.label_pattern.format(id=case_id)).write_bytes(b"\x1f\x8b not a label")
    episodes = label_free_episodes(SYN, syn_root, 0, 12, image_size=32, min_size=20)
    assert len(episodes) == 12 and set(episodes.case_ids) <= {3, 11}
    assert episodes.supp_imgs.shape == (12, 1, 3, 32, 32) and episodes.qry_labels.shape == (12, 1, 32, 32)
    assert episodes.qry_labels.flatten(1).any(dim=1).all()  # every query holds its supervoxel
    # the training sampler's rules on those volumes, no augmentation, the fixed seed
    same = TrainDataset(
        SYN,
        syn_root,
        0,
        image_size=32,
        min_size=20,
        augment=False,
        seed=LABEL_FREE_SEED,
        length=12,
        held_out=True,
    )
    for i in range(12):
        torch.testing.assert_close(episodes.qry_imgs[i], same[i]["qry_imgs"], rtol=0, atol=0)
    with pytest.raises(
        ValueError, match="held_out episodes read the held-out volumes' images and supervoxels"
    ):
        TrainDataset(SYN, syn_root, 0, use_gt=True, held_out=True)


def test_no_drawable_held_out_volume_is_an_error(syn_root: Path) -> None:
    with pytest.raises(
        ValueError, match=r"no episode can be drawn from any of the 2 held-out volumes \(cases \[3, 11\]\)"
    ):
        label_free_episodes(SYN, syn_root, 0, 4, min_size=10_000)


def test_scores_are_those_of_the_definition_and_leave_the_run_untouched(syn_root: Path) -> None:
    episodes = label_free_episodes(SYN, syn_root, 0, 10, image_size=32, min_size=20)
    torch.manual_seed(0)
    drawing = tiny_difd(8, reduce_dim=8, region_sampling="random").train()  # its forward draws globally
    before = capture_rng_state()
    label_free_scores(drawing, episodes, torch.device("cpu"))
    after = capture_rng_state()
    assert drawing.training and torch.equal(after["torch"], before["torch"])
    assert after["python"] == before["python"]
    model = tiny_difd(8, reduce_dim=8).train()
    scores = label_free_scores(model, episodes, torch.device("cpu"))
    # the same forward episode by episode (batched above: float32 sums in another order), by the definitions
    aucs, dices = [], []
    with monitoring(model), torch.inference_mode():
        for i in range(len(episodes)):
            probs = model(
                episodes.supp_imgs[i : i + 1], episodes.supp_masks[i : i + 1], episodes.qry_imgs[i : i + 1]
            )
            prob, label = probs.query_probs[0, 0], episodes.qry_labels[i, 0].numpy()
            aucs.append(_pairwise_auc(prob[1].numpy().ravel(), label.ravel()))
            dices.append(dice_iou(prob.argmax(dim=0).numpy(), label)[0])
    assert scores["lf_auc"] == pytest.approx(np.mean(aucs), abs=1e-4)
    assert scores["lf_dice"] == pytest.approx(np.mean(dices), abs=1e-4)
    assert set(scores) == {"lf_auc", "lf_dice"} and 0.0 <= scores["lf_auc"] <= 1.0


def test_real_held_out_volumes(data_root: Path) -> None:
    info = get_dataset_info("CMR")
    episodes = label_free_episodes(info, data_root, 0, 6, image_size=32, min_size=3)
    assert set(episodes.case_ids) <= {case for case in range(1, 9)}  # fold 0: positions 0-7 = cases 1-8
