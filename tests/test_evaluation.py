"""The evaluation protocol's code path (engine.evaluation): batched chunk prediction, and validation during
training (``validate`` on a small DIFD with ``region_sampling='random'``, whose forward draws from the global
torch RNG: the RNG states and the training mode are restored, and the scores are those of
``evaluate_class``, the loop ``test.py`` runs)."""

from __future__ import annotations

import numpy as np
import torch

from engine.evaluation import evaluate_class, predict_query_volume, validate
from tests.tiny_difd import tiny_difd
from utils import capture_rng_state, restore_rng_state


def _states_equal(a: dict, b: dict) -> bool:
    return (
        a["python"] == b["python"]
        and all(np.array_equal(x, y) for x, y in zip(a["numpy"], b["numpy"], strict=True))
        and torch.equal(a["torch"], b["torch"])
    )


def test_validate_restores_rng_and_training_mode(rk_sets):
    _, preloaded = rk_sets
    torch.manual_seed(0)
    model = tiny_difd(8, reduce_dim=8, region_sampling="random").train()
    before = capture_rng_state()
    scores = validate(model, {"RK": preloaded}, torch.device("cpu"))
    assert model.training and _states_equal(capture_rng_state(), before)
    assert set(scores) == {"RK", "mean"} and scores["mean"] == scores["RK"]

    # The same forward passes without validate's guard do consume the global stream (so the guard
    # matters), and give the scores validate returned: the loop of test.py.
    restore_rng_state(before)
    entry = evaluate_class(model.eval(), preloaded, torch.device("cpu"))
    assert not _states_equal(capture_rng_state(), before)
    assert entry["mean_dice"] == scores["RK"]


def test_batched_chunk_prediction_equals_one_slice_at_a_time():
    torch.manual_seed(0)
    model = tiny_difd(8, reduce_dim=8).eval()
    support = {"imgs": torch.randn(3, 3, 32, 32), "masks": torch.zeros(3, 32, 32)}
    support["masks"][:, 8:20, 10:24] = 1
    n_slices = 7
    query = {
        "imgs": torch.randn(n_slices, 3, 32, 32),
        "labels": torch.zeros(n_slices, 48, 48, dtype=torch.int64),  # native size differs: upsampling path
        "chunks": [(0, 2), (2, 4), (4, 7)],
        "chunk_support": [0, 1, 2],
    }
    batched = predict_query_volume(model, support, query, torch.device("cpu"))
    assert batched.shape == (n_slices, 48, 48) and batched.dtype == torch.int64
    singles = []
    for z in range(n_slices):
        k = next(i for i, (start, end) in enumerate(query["chunks"]) if start <= z < end)
        one = {**query, "imgs": query["imgs"][z : z + 1], "labels": query["labels"][z : z + 1]}
        one["chunks"], one["chunk_support"] = [(0, 1)], [k]
        singles.append(predict_query_volume(model, support, one, torch.device("cpu")))
    torch.testing.assert_close(batched, torch.cat(singles), rtol=0, atol=0)
