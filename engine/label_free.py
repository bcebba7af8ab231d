"""Label-free validation: how well a run follows a support's supervoxel into a query slice of volumes it never
trains on, read without any organ label.

A fixed set of self-supervised episodes (:func:`label_free_episodes`) is drawn once, with the training
sampler's rules (method.md §3) but no augmentation and its own seed (:data:`LABEL_FREE_SEED`), from the
fold's held-out volumes: their images and supervoxels only, never their labels. Each validation runs the
training forward (``model(supp_imgs, supp_masks, qry_imgs)``, the run's precision) in eval mode under
:func:`engine.evaluation.monitoring` and scores each query's foreground probability ``p_fg`` against its
pseudo-label (the supervoxel's mask):

* ``lf_auc``: the AUC of ``p_fg`` over the query's pixels (the probability that a pixel of the supervoxel
  ranks above one outside it; ties count one half), threshold-free; 0.5 is chance. Averaged over the
  queries whose pseudo-label is neither empty nor the whole slice;
* ``lf_dice``: the Dice of the protocol's argmax mask (``p_fg > 0.5``) against the pseudo-label, averaged
  over the queries.

A model can learn to rank the support's region above the rest (the AUC rises) while its probabilities
drift towards background (the thresholded Dice falls): the curve is read on the AUC, with the Dice beside
it. No label is read, so choosing anything by this curve cannot leak the test labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from dataloaders import DatasetInfo, TrainDataset
from engine.evaluation import monitoring
from engine.metrics import dice_iou
from engine.progress import LABEL_FREE_METRICS
from engine.runtime import autocast

#: Seed of the label-free episodes (episode ``i`` is a function of ``(LABEL_FREE_SEED, i)``): fixed, so that
#: every validation of a run, and every run of a fold, scores the same episodes.
LABEL_FREE_SEED = 1
#: Episodes per forward pass.
BATCH = 8


@dataclass
class LabelFreeEpisodes:
    """The fixed episodes. Shapes: ``supp_imgs (E, S, 3, H, W)``, ``supp_masks (E, S, H, W)``,
    ``qry_imgs (E, Q, 3, H, W)``, ``qry_labels (E, Q, H, W)`` (pseudo-labels {0, 1}); ``case_ids (E,)``."""

    supp_imgs: torch.Tensor
    supp_masks: torch.Tensor
    qry_imgs: torch.Tensor
    qry_labels: torch.Tensor
    case_ids: list[int]

    def __len__(self) -> int:
        return len(self.case_ids)


def label_free_episodes(
    dataset: str | DatasetInfo,
    data_root: str | os.PathLike,
    eval_fold: int,
    n_episodes: int,
    n_shot: int = 1,
    n_query: int = 1,
    min_size: int = 200,
    image_size: int | None = None,
    n_sv: int | None = None,
) -> LabelFreeEpisodes:
    """The ``n_episodes`` label-free episodes of fold ``eval_fold``'s held-out volumes (module docstring).

    Raises ``ValueError`` naming the fold and its volumes when no episode can be drawn from them.
    """
    if n_episodes < 1:
        raise ValueError(f"label_free_episodes: expected a positive number of episodes, got {n_episodes}")
    source = TrainDataset(
        dataset,
        data_root,
        eval_fold,
        n_shot=n_shot,
        n_query=n_query,
        min_size=min_size,
        image_size=image_size,
        augment=False,
        seed=LABEL_FREE_SEED,
        length=n_episodes,
        n_sv=n_sv,
        held_out=True,
    )
    items = [source[i] for i in range(n_episodes)]
    stacked = {
        key: torch.stack([item[key] for item in items]) for key in ("supp_imgs", "supp_masks", "qry_imgs")
    }
    labels = torch.stack([item["qry_labels"] for item in items])
    return LabelFreeEpisodes(**stacked, qry_labels=labels, case_ids=[int(item["case_id"]) for item in items])


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the binary ``labels`` (Mann-Whitney U with average ranks
    for ties); NaN when ``labels`` hold a single class. Shapes: any, the same for both."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(labels, dtype=bool).ravel()
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def label_free_scores(
    model: nn.Module, episodes: LabelFreeEpisodes, device: torch.device, precision: str = "fp32"
) -> dict[str, float]:
    """``{"lf_auc", "lf_dice"}`` of ``model`` on the episodes (module docstring), under
    :func:`engine.evaluation.monitoring`."""
    aucs, dices = [], []
    with monitoring(model), torch.inference_mode():
        for start in range(0, len(episodes), BATCH):
            batch = slice(start, start + BATCH)
            with autocast(device, precision):
                out = model(
                    episodes.supp_imgs[batch].to(device),
                    episodes.supp_masks[batch].to(device),
                    episodes.qry_imgs[batch].to(device),
                )
            probs = out.query_probs.float().cpu()  # (b, Q, 2, H, W)
            for prob, label in zip(
                probs.flatten(0, 1), episodes.qry_labels[batch].flatten(0, 1), strict=True
            ):
                aucs.append(auc(prob[1].numpy(), label.numpy()))
                dices.append(dice_iou(prob.argmax(dim=0).numpy(), label.numpy())[0])
    defined = [value for value in aucs if not np.isnan(value)]
    auc_name, dice_name = LABEL_FREE_METRICS
    return {
        auc_name: float(np.mean(defined)) if defined else float("nan"),
        dice_name: float(np.mean(dices)),
    }
