"""Loop-for-loop port of SSL-ALPNet's episode draw (``SuperpixelDataset.read_dataset`` and ``__getitem__`` of
its ``dataloaders/GenericSuperDatasetv2.py``), written from reading it, for the distribution tests of
``TrainDataset(sampling='ssl_alpnet')``. Transforms are left out: this port returns what is drawn.

``torch.randint`` is replaced by a ``numpy.random.Generator`` with the same bounds (high exclusive); the
DataLoader index is drawn uniformly in ``0 .. N - 1``.
"""

from __future__ import annotations

import numpy as np


class NaiveSuperpixelSampler:
    """``scans``: ``{scan_id: ids (Z, H, W)}`` in load order; ``excluded``: ``{scan_id: [z, ...]}`` the slices
    holding an excluded class (the official ``tp1_cls_map`` lookups, all excluded classes together)."""

    def __init__(self, scans: dict[int, np.ndarray], excluded: dict[int, list[int]]) -> None:
        self.actual_dataset = []
        for scan_id, ids in scans.items():
            for z in range(ids.shape[0]):
                self.actual_dataset.append(
                    {"lb": ids[z], "sup_max_cls": ids[z].max(), "scan_id": scan_id, "z_id": z}
                )
        self.excluded = excluded

    def __len__(self) -> int:
        return len(self.actual_dataset)

    def getitem(self, index: int, rng: np.random.Generator) -> tuple[int, int, int, np.ndarray]:
        """``(scan_id, z, superpixel id, binary mask)`` as the official ``__getitem__`` draws them."""
        index = index % len(self.actual_dataset)
        curr = self.actual_dataset[index]
        sup_max_cls = curr["sup_max_cls"]
        if sup_max_cls < 1:
            return self.getitem(index + 1, rng)
        if curr["z_id"] in self.excluded.get(curr["scan_id"], []):
            return self.getitem(int(rng.integers(low=0, high=len(self) - 1)), rng)
        bi_val = int(rng.integers(low=1, high=int(sup_max_cls)))
        return curr["scan_id"], curr["z_id"], bi_val, np.float32(curr["lb"] == bi_val)

    def draw(self, rng: np.random.Generator) -> tuple[int, int, int, np.ndarray]:
        """One episode from a uniform DataLoader index."""
        return self.getitem(int(rng.integers(len(self))), rng)
