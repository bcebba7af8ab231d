"""Stage 3 of inference: a scan in the model's frame → each organ's foreground probabilities in that frame.

Per organ, as the evaluation protocol of method.md §5 but without the query's ground truth:

* **support**: ``n_part`` slices at the protocol's positions among the support's labelled slices
  (:func:`~dataloaders.test_dataset.support_slice_indices`), encoded once (the method's ``encode_support``)
  and
  reused for every query slice and every query (:func:`encode_support`);
* **placement**: the query's slices through the organ are split into ``n_part`` chunks
  (:func:`~dataloaders.test_dataset.chunk_bounds`), chunk ``k`` segmented with support slice ``k``. The
  organ's slice extent is a given range, or estimated from the query itself (:func:`estimate_extent`): a
  first pass segments every slice with the middle support slice; the extent is the window as long (in
  millimetres) as the organ in the support that holds the most first-pass foreground probability; the
  middle chunk keeps its first-pass result. When no slice reaches :data:`PRESENCE_FRACTION` of the smallest
  support mask, the organ is absent. Slices outside the extent are background;
* **speed**: every query slice is encoded once (batches of ``batch_size`` slices) and its features serve
  both passes and every organ (:class:`ModelRunner`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataloaders import chunk_bounds, support_slice_indices
from engine.runtime import autocast
from inference.frames import ModelFrame, masks_at_size

#: The organ is found in a query when the first pass predicts, on some slice, at least this fraction of the
#: smallest support-mask area (at the model size).
PRESENCE_FRACTION = 0.1
DEFAULT_BATCH_SIZE = 8


@dataclass
class ModelRunner:
    """The model calls of inference: a method's network (eval mode, on ``device``; the calls of
    :mod:`models.methods`) with its run settings. Query encodings are tuples of tensors with the slices on
    dimension 0; support encodings are whatever the method's ``encode_support`` returns."""

    model: torch.nn.Module
    device: torch.device
    precision: str
    channels_last: bool
    batch_size: int

    def _batches(self, n: int) -> list[slice]:
        return [slice(start, min(start + self.batch_size, n)) for start in range(0, n, self.batch_size)]

    def images(self, slices: np.ndarray) -> torch.Tensor:
        """``(N, s, s)`` normalised slices → ``(N, 3, s, s)`` on the device (channels-last when set)."""
        x = torch.from_numpy(np.ascontiguousarray(slices)).to(self.device)[:, None].expand(-1, 3, -1, -1)
        return x.contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )

    def encode_slices(self, slices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The method's query encoding of ``(N, s, s)`` slices, in batches: tensors ``(N, ...)``."""
        parts = []
        with torch.inference_mode():
            for batch in self._batches(len(slices)):  # bounded memory: batch_size slices per forward
                with autocast(self.device, self.precision):
                    parts.append(tuple(self.model.encode_queries(self.images(slices[batch]))))
        return tuple(torch.cat(tensors) for tensors in zip(*parts, strict=True))

    def predict(self, support: Any, queries: tuple[torch.Tensor, ...]) -> np.ndarray:
        """Foreground probabilities of encoded query slices (``queries``: tensors ``(N, ...)``) against one
        support episode, in batches. Shape: → ``(N, s, s)`` float32 on the host.
        """
        out = []
        with torch.inference_mode():
            for batch in self._batches(len(queries[0])):
                with autocast(self.device, self.precision):
                    probs = self.model.segment_encoded(support, *(q[batch].unsqueeze(0) for q in queries))
                out.append(probs[0, :, 1].float().cpu())
        return torch.cat(out).numpy()

    def encode_support(self, slices: np.ndarray, masks: np.ndarray) -> Any:
        """``n`` support slices ``(n, s, s)`` with their masks ``(n, s, s)`` as ``n`` one-shot episodes."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.model.encode_support(
                self.images(slices).unsqueeze(1), torch.from_numpy(masks).to(self.device).unsqueeze(1)
            )


def estimate_extent(scores: np.ndarray, length: int) -> tuple[int, int]:
    """The organ's slice extent ``[start, end)``: the ``length`` consecutive slices with the largest total
    first-pass score (the earliest window on a tie; the whole volume when it is shorter).

    Shape: ``scores (Z,)``, e.g. the first pass's foreground probability summed per slice.
    """
    scores = np.asarray(scores, dtype=np.float64)
    length = max(1, min(int(length), len(scores)))
    running = np.concatenate([[0.0], np.cumsum(scores)])
    start = int(np.argmax(running[length:] - running[:-length]))
    return start, start + length


@dataclass
class SupportOrgan:
    """One organ of the support: its labelled slices (count, and extent in mm from the first to the last),
    its ``n_part`` slices (model frame and support file), their smallest mask area at the model size and
    their encoding (``encoded``: ``B = n_part`` episodes of one shot; episode ``k`` serves chunk ``k``)."""

    value: int
    n_labelled: int
    length_mm: float
    slices: list[int]
    source_slices: list[int]
    min_area: float
    encoded: Any


@dataclass
class PreparedSupport:
    """The encoded support of every requested organ, and how long it took."""

    organs: dict[int, SupportOrgan]
    seconds: float


def encode_support(
    runner: ModelRunner,
    frame: ModelFrame,
    label_masks: dict[int, np.ndarray],
    n_part: int,
    image_size: int | None,
    label_source: str,
) -> dict[int, SupportOrgan]:
    """Choose and encode each organ's ``n_part`` support slices (module docstring).

    ``label_masks[value] (Z', H', W')``: each organ's support mask in the model frame
    (:func:`inference.frames.support_to_model_frame`); ``label_source`` names the label in errors.
    """
    organs = {}
    for value, mask in label_masks.items():
        labelled = np.flatnonzero(mask.any(axis=(1, 2)))
        if labelled.size == 0:
            raise ValueError(
                f"{label_source}: label {value} disappears in the preset's resampling; it is too small to "
                "use as a support"
            )
        chosen = labelled[support_slice_indices(len(labelled), n_part)]
        masks = masks_at_size(mask[chosen], image_size)
        areas = masks.sum(axis=(1, 2))
        if not areas.all():
            raise ValueError(
                f"{label_source}: label {value} covers no pixel at the model's {image_size}-pixel slice size "
                f"on support slice(s) {chosen[areas == 0].tolist()}"
            )
        organs[value] = SupportOrgan(
            value=value,
            n_labelled=int(labelled.size),
            length_mm=float(labelled[-1] - labelled[0] + 1) * frame.geometry.spacing[2],
            slices=chosen.tolist(),
            source_slices=[frame.axis_map.source_slice(int(k), frame.source_shape) for k in chosen],
            min_area=float(areas.min()),
            encoded=runner.encode_support(frame.slices[chosen], masks),
        )
    return organs


def predict_organs(
    runner: ModelRunner,
    support: PreparedSupport,
    frame: ModelFrame,
    query_range: tuple[int, int] | None,
    n_part: int,
) -> tuple[dict[int, np.ndarray], dict[int, dict[str, Any]], dict[str, float]]:
    """Foreground probabilities ``(Z', s, s)`` of every organ of ``support`` in the query ``frame``, where
    each organ was placed, and the seconds spent encoding and predicting.

    ``query_range``: the organs' known extent on the scan's own slice axis (checked), else None (estimated
    per organ). Placement per organ: ``extent_source`` ('given' or 'estimated'), ``extent`` (the scan's
    slices segmented, [first, last], or None when the first pass found nothing) and ``support_slices`` (per
    chunk: the support slice and the scan's slices [first, last] it segmented).
    """
    timings: dict[str, float] = {}
    given = None if query_range is None else frame.model_range(query_range)
    first, last = given if given is not None else (0, len(frame.slices))
    clock = time.perf_counter()
    queries = runner.encode_slices(frame.slices[first:last])  # once for every organ and pass
    timings["encode"] = time.perf_counter() - clock

    clock = time.perf_counter()
    mid = n_part // 2
    organ_probs, placements = {}, {}
    for value, organ in support.organs.items():
        probs = np.zeros(frame.slices.shape, dtype=np.float32)
        first_pass = None
        if given is None:
            first_pass = runner.predict(organ.encoded.episode(mid), queries)
            found = (first_pass > 0.5).sum(axis=(1, 2)).max() >= PRESENCE_FRACTION * organ.min_area
            length = round(organ.length_mm / frame.geometry.spacing[2])
            extent = estimate_extent(first_pass.sum(axis=(1, 2)), length) if found else None
        else:
            extent = (0, last - first)  # positions among the encoded slices
        chunks = []
        if extent is not None:
            for k, (a, b) in enumerate(chunk_bounds(extent[1] - extent[0], n_part)):
                a, b = a + extent[0], b + extent[0]
                if b <= a:
                    continue
                if first_pass is not None and k == mid:
                    probs[first + a : first + b] = first_pass[a:b]
                else:
                    probs[first + a : first + b] = runner.predict(
                        organ.encoded.episode(k), tuple(q[a:b] for q in queries)
                    )
                chunks.append((organ.source_slices[k], first + a, first + b))
        organ_probs[value] = probs
        placements[value] = {
            "extent_source": "estimated" if given is None else "given",
            "extent": None if extent is None else frame.source_span(first + extent[0], first + extent[1]),
            "support_slices": [
                {"support_slice": s, "query_slices": frame.source_span(a, b)} for s, a, b in chunks
            ],
        }
    timings["predict"] = time.perf_counter() - clock
    return organ_probs, placements, timings
