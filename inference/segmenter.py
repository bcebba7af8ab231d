"""Apply a trained DIFD model to a user's own scans: one labelled support, any number of queries.

:class:`Segmenter` holds the model, its preset (:mod:`inference.presets`) and the run settings;
:meth:`Segmenter.segment` takes SimpleITK images or :class:`~inference.volumes.Volume` objects and returns,
per query, a label map on exactly the query's grid (same type as given) with per-organ figures.

Per organ (``labels``), as the evaluation protocol of spec section 5 but without the query's ground truth:

* **support**: ``n_part`` slices at the protocol's positions among the support's labelled slices
  (:func:`~dataloaders.test_dataset.support_slice_indices`), encoded once (:meth:`DIFD.encode_support`) and
  reused for every query slice and every query;
* **placement**: the query's slices through the organ are split into ``n_part`` chunks
  (:func:`~dataloaders.test_dataset.chunk_bounds`), chunk ``k`` segmented with support slice ``k``. The
  organ's slice extent is a given ``query_range``, or estimated from the query itself
  (:func:`estimate_extent`): a first pass segments every slice with the middle support slice; the extent is
  the window as long (in millimetres) as the organ in the support that holds the most first-pass
  foreground probability; the middle chunk keeps its first-pass result. When no slice reaches
  :data:`PRESENCE_FRACTION` of the smallest support mask, the organ is absent. Slices outside the extent
  are background;
* **speed**: every query slice is encoded once (batches of ``batch_size`` slices) and its features serve
  both passes and every organ; bfloat16 autocast and channels-last on CUDA by default.

Probabilities go back to the query grid (linear resampling of the foreground probability, then the
threshold 0.5, i.e. the protocol's argmax with ties to background). With several organs, a voxel whose
foreground probability exceeds 0.5 for more than one takes the organ with the highest probability (the
first of ``labels`` on an exact tie).
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from checkpoint import ModelCheckpoint, load_model_weights, read_model_checkpoint
from dataloaders.io import Geometry
from dataloaders.test_dataset import chunk_bounds, support_slice_indices
from inference.presets import (
    DATASET_PRESETS,
    ModelFrame,
    Preset,
    get_preset,
    label_to_model_frame,
    layout_map,
    masks_at_size,
    to_model_frame,
)
from inference.volumes import Volume, check_scan, describe_grid, sitk
from models import DIFD, EncodedSupport, build_difd
from models.encoder import FEATURE_CHANNELS
from runtime import apply_memory_format, autocast, check_precision
from utils import resolve_device

#: Keys every DIFD state dict holds (official module tree, spec section 6).
DIFD_KEYS = (
    "encoder.backbone.conv1.weight",
    "encoder.reduce1.weight",
    "encoder.reduce1d.weight",
    "fuse.weight",
    "decoder1.merge.0.weight",
    "decoder2.merge.0.weight",
)
#: Decoder input channels → ``decoder_extra_maps`` (2C+1: the paper's, 2C+3: the official decoders').
DECODER_CHANNELS = {2 * FEATURE_CHANNELS + 1: False, 2 * FEATURE_CHANNELS + 3: True}
#: The organ is found in a query when the first pass predicts, on some slice, at least this fraction of the
#: smallest support-mask area (at the model size).
PRESENCE_FRACTION = 0.1
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself: path, SHA-256, and for our snapshots their step and config."""

    path: Path
    sha256: str
    config: dict[str, Any] | None
    step: int | None
    decoder_extra_maps: bool

    def report(self) -> dict[str, Any]:
        keys = ("dataset", "image_size", "eval_fold", "setting", "use_gt", "decoder_extra_maps")
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "step": self.step,
            "config": None if self.config is None else {k: self.config.get(k) for k in keys},
        }


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inspect_checkpoint(path: str | os.PathLike) -> tuple[CheckpointInfo, ModelCheckpoint]:
    """Check that ``path`` holds a DIFD model (our snapshot of either kind, or an official state dict) and
    read it once (:func:`checkpoint.read_model_checkpoint`: verified, ``criterion.weight`` checked).

    Returns what the report says about it and the weights. Raises ``ValueError`` naming the file for
    another architecture (keys or decoder width not DIFD's) or a snapshot whose recorded
    ``decoder_extra_maps`` contradicts its weights.
    """
    path = Path(path)
    checkpoint = read_model_checkpoint(path)
    state = checkpoint.state
    missing = [key for key in DIFD_KEYS if key not in state]
    if missing:
        sample = ", ".join(list(state)[:4])
        raise ValueError(
            f"{path}: not a DIFD checkpoint (another architecture?): it lacks {missing}; "
            f"its {len(state)} tensors are named like {sample}"
        )
    channels = int(state["decoder1.merge.0.weight"].shape[1])
    if channels not in DECODER_CHANNELS:
        raise ValueError(
            f"{path}: decoder1.merge.0.weight takes {channels} input channels; a DIFD decoder takes "
            f"{sorted(DECODER_CHANNELS)} (2C+1 or 2C+3 with C = {FEATURE_CHANNELS})"
        )
    extra_maps = DECODER_CHANNELS[channels]
    config = None if checkpoint.config is None else dict(checkpoint.config)
    if config is not None:
        recorded = config.get("decoder_extra_maps", extra_maps)
        if bool(recorded) != extra_maps:
            raise ValueError(
                f"{path}: the snapshot's config says decoder_extra_maps={recorded}, but its decoders take "
                f"{channels} channels (decoder_extra_maps={extra_maps})"
            )
    info = CheckpointInfo(path, sha256_of(path), config, checkpoint.step, extra_maps)
    return info, checkpoint


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
    encoded: EncodedSupport


@dataclass
class PreparedSupport:
    """The encoded support of every requested organ, and how long it took."""

    organs: dict[int, SupportOrgan]
    seconds: float


@dataclass
class Segmentation:
    """One query's result: ``label_map (Z, H, W)`` on the query's own grid (0 = background, else the
    organ's label value), per-organ figures (:meth:`Segmenter.segment_volume`) and timings in seconds."""

    label_map: np.ndarray
    geometry: Geometry
    organs: dict[int, dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)


def label_dtype(labels: Sequence[int]) -> np.dtype:
    """Smallest unsigned integer type holding every label value."""
    top = max(labels)
    return np.dtype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32)


def combine_labels(
    probabilities: Iterable[tuple[int, np.ndarray]], shape: tuple[int, ...], labels: Sequence[int]
) -> np.ndarray:
    """One label map from per-organ foreground probabilities: a voxel takes the organ of highest
    probability among those above 0.5 (the argmax with ties to background; the earlier organ on an exact
    tie), else 0. Consumes ``(value, (Z, H, W) probability)`` pairs one at a time (bounded memory)."""
    label_map = np.zeros(shape, dtype=label_dtype(labels))
    best = np.full(shape, 0.5, dtype=np.float32)
    for value, prob in probabilities:
        wins = prob > best
        label_map[wins] = value
        best[wins] = prob[wins]
    return label_map


def check_support(image: Volume, label: Volume, labels: Sequence[int], sources: tuple[str, str]) -> None:
    """Support image and label on one grid, an integer-valued label holding every requested value."""
    image_source, label_source = sources
    if not image.same_grid(label):
        raise ValueError(
            f"support image and label are on different grids: {image_source} has {describe_grid(image)}; "
            f"{label_source} has {describe_grid(label)}"
        )
    values = np.unique(label.array)
    if not np.array_equal(values, np.rint(values)):
        raise ValueError(
            f"{label_source}: a label map must hold integers, found values such as "
            f"{values[values != np.rint(values)][:5].tolist()}"
        )
    check_labels(labels)
    absent = [v for v in labels if v not in values]
    if absent:
        raise ValueError(
            f"{label_source}: label value(s) {absent} not found; the support label holds "
            f"{[int(v) for v in values if v != 0]} (and 0)"
        )


def check_labels(labels: Sequence[int]) -> list[int]:
    """Label values to segment: at least one, positive, integers, no repeats."""
    if not labels:
        raise ValueError("labels: expected at least one label value to segment, got none")
    bad = [v for v in labels if isinstance(v, bool) or int(v) != v or int(v) <= 0]
    if bad or len(set(labels)) != len(labels):
        raise ValueError(f"labels: expected distinct positive integers (0 is background), got {list(labels)}")
    return [int(v) for v in labels]


class Segmenter:
    """A DIFD model ready for inference on a preset's kind of scan.

    Args:
        model: the DIFD model (weights loaded); moved to ``device`` and put in ``eval()`` mode.
        preset: a :class:`~inference.presets.Preset` or its name.
        image_size: the working slice size (the checkpoint's ``image_size``; None: the preset's crop size).
        device: a ``torch.device`` or name (``'auto'``, ``'cpu'``, ``'cuda'``).
        precision: ``'fp32'`` or ``'bf16'``; None: bf16 on CUDA, fp32 elsewhere.
        channels_last: NHWC convolutions; None: on CUDA only.
        batch_size: query slices per forward.
        n_part: support slices per organ (the protocol's 3).
        checkpoint: where the weights came from (for the report).
    """

    def __init__(
        self,
        model: DIFD,
        preset: str | Preset,
        image_size: int | None = None,
        device: str | torch.device = "auto",
        precision: str | None = None,
        channels_last: bool | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        n_part: int = 3,
        checkpoint: CheckpointInfo | None = None,
    ) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        on_cuda = self.device.type == "cuda"
        self.precision = check_precision(precision or ("bf16" if on_cuda else "fp32"))
        self.channels_last = on_cuda if channels_last is None else channels_last
        if image_size is not None and (
            isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1
        ):
            raise ValueError(f"image_size: expected None or a positive integer, got {image_size!r}")
        if int(batch_size) < 1 or int(n_part) < 1:
            raise ValueError(f"batch_size and n_part must be positive, got {batch_size} and {n_part}")
        self.preset = get_preset(preset)
        self.image_size = None if image_size is None else int(image_size)
        self.batch_size = int(batch_size)
        self.n_part = int(n_part)
        self.checkpoint = checkpoint
        self.model = apply_memory_format(model.to(self.device), self.channels_last).eval()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, preset: str | None = None, **options: Any) -> Segmenter:
        """Build the model a checkpoint holds and load it (:func:`checkpoint.load_model_weights`).

        ``preset`` defaults to the dataset the snapshot records; an official state dict records none, so it
        needs one. The working size is the snapshot's ``image_size``. ``options``: the other arguments of
        :class:`Segmenter`.
        """
        info, checkpoint = inspect_checkpoint(path)
        config = info.config or {}
        if preset is None:
            if config.get("dataset") not in DATASET_PRESETS:
                raise ValueError(
                    f"{path}: the checkpoint records no dataset ({config.get('dataset')!r}), so choose a "
                    f"preset: one of {sorted(DATASET_PRESETS.values())}"
                )
            preset = DATASET_PRESETS[config["dataset"]]
        elif DATASET_PRESETS.get(config.get("dataset"), preset) != get_preset(preset).name:
            warnings.warn(
                f"preset {get_preset(preset).name!r} is not the preset of the checkpoint's dataset "
                f"{config['dataset']!r} ({DATASET_PRESETS[config['dataset']]!r}): the scans will not look "
                "like the model's training data",
                stacklevel=2,
            )
        with warnings.catch_warnings():
            # The encoder warns that it is randomly initialised: the checkpoint overwrites every weight.
            warnings.filterwarnings("ignore", message=".*randomly initialised.*")
            model = build_difd(
                pretrained_weights=None,
                decoder_extra_maps=info.decoder_extra_maps,
                region_sampling=config.get("region_sampling", "official"),
                multi_shot=config.get("multi_shot", "official"),
            )
        load_model_weights(model, checkpoint)
        return cls(model, preset, image_size=config.get("image_size"), checkpoint=info, **options)

    # ------------------------------------------------------------------------------------------ model calls
    def _batches(self, n: int) -> list[slice]:
        return [slice(start, min(start + self.batch_size, n)) for start in range(0, n, self.batch_size)]

    def _images(self, slices: np.ndarray) -> torch.Tensor:
        """``(N, s, s)`` normalised slices → ``(N, 3, s, s)`` on the device (channels-last when set)."""
        x = torch.from_numpy(np.ascontiguousarray(slices)).to(self.device)[:, None].expand(-1, 3, -1, -1)
        return x.contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )

    def encode_slices(self, slices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features and thresholds of ``(N, s, s)`` slices, in batches: ``(N, C, h, w)``, ``(N,)``."""
        feats, thresholds = [], []
        with torch.inference_mode():
            for batch in self._batches(len(slices)):  # bounded memory: batch_size slices per forward
                with autocast(self.device, self.precision):
                    f, t = self.model.encode_queries(self._images(slices[batch]))
                feats.append(f)
                thresholds.append(t)
        return torch.cat(feats), torch.cat(thresholds)

    def predict(self, support: EncodedSupport, feats: torch.Tensor, thresholds: torch.Tensor) -> np.ndarray:
        """Foreground probabilities of encoded query slices against one support episode, in batches.

        Shape: ``(N, C, h, w)``, ``(N,)`` → ``(N, s, s)`` float32 on the host.
        """
        out = []
        with torch.inference_mode():
            for batch in self._batches(len(feats)):
                with autocast(self.device, self.precision):
                    probs = self.model.segment_encoded(
                        support, feats[batch].unsqueeze(0), thresholds[batch].unsqueeze(0)
                    )
                out.append(probs[0, :, 1].float().cpu())
        return torch.cat(out).numpy()

    # ------------------------------------------------------------------------------------------------ support
    def prepare_support(
        self,
        image: Volume,
        label: Volume,
        labels: Sequence[int],
        reorient: bool = True,
        sources: tuple[str, str] = ("support image", "support label"),
    ) -> PreparedSupport:
        """Preprocess the support and encode ``n_part`` slices per organ (see the module docstring).

        ``sources`` name the image and the label in errors.
        """
        start = time.perf_counter()
        labels = check_labels(labels)
        check_scan(image, sources[0])
        check_scan(label, sources[1], constant_ok=True)
        check_support(image, label, labels, sources)
        axis_map = layout_map(image, self.preset, reorient)
        frame = to_model_frame(image, self.preset, self.image_size, axis_map, sources[0])
        # requested values → 1..n, so that any integer values (CMR's 500, ...) fit the uint8 label steps
        remapped = np.zeros(label.shape, dtype=np.uint8)
        for index, value in enumerate(labels, start=1):
            remapped[label.array == value] = index
        label_frame = label_to_model_frame(Volume(remapped, label.geometry), self.preset, axis_map)
        organs = {}
        for index, value in enumerate(labels, start=1):
            mask = label_frame == index
            labelled = np.flatnonzero(mask.any(axis=(1, 2)))
            if labelled.size == 0:
                raise ValueError(
                    f"{sources[1]}: label {value} disappears in the preset's resampling "
                    f"({self.preset.name}); it is too small to use as a support"
                )
            chosen = labelled[support_slice_indices(len(labelled), self.n_part)]
            masks = masks_at_size(mask[chosen], self.image_size)
            areas = masks.sum(axis=(1, 2))
            if not areas.all():
                raise ValueError(
                    f"{sources[1]}: label {value} covers no pixel at the model's {self.image_size}-pixel "
                    f"slice size on support slice(s) {chosen[areas == 0].tolist()}"
                )
            with torch.inference_mode(), autocast(self.device, self.precision):
                encoded = self.model.encode_support(
                    self._images(frame.slices[chosen]).unsqueeze(1),
                    torch.from_numpy(masks).to(self.device).unsqueeze(1),
                )
            organs[value] = SupportOrgan(
                value=value,
                n_labelled=int(labelled.size),
                length_mm=float(labelled[-1] - labelled[0] + 1) * frame.geometry.spacing[2],
                slices=chosen.tolist(),
                source_slices=[axis_map.source_slice(int(k), image.shape) for k in chosen],
                min_area=float(areas.min()),
                encoded=encoded,
            )
        return PreparedSupport(organs, time.perf_counter() - start)

    # -------------------------------------------------------------------------------------------------- query
    def _model_range(self, frame: ModelFrame, query_range: tuple[int, int], source: str) -> tuple[int, int]:
        """A query range on the scan's own slice axis (``[z0, z1)``) → the model frame's slices."""
        z0, z1 = (int(v) for v in query_range)
        depth = frame.source_shape[0]
        if not 0 <= z0 < z1 <= depth:
            raise ValueError(f"{source}: query range {z0}:{z1} is outside its {depth} slices (0:{depth})")
        if not frame.axis_map.keeps_slice_axis:
            raise ValueError(
                f"{source}: the query's slice axis is not the model's ({self.preset.name} layout), so a "
                "query range along it does not select model slices; omit the range"
            )
        return (depth - z1, depth - z0) if frame.axis_map.flip[2] else (z0, z1)

    def segment_volume(
        self,
        support: PreparedSupport,
        query: Volume,
        query_range: tuple[int, int] | None = None,
        reorient: bool = True,
        source: str = "query",
    ) -> Segmentation:
        """Segment one query (module docstring). ``query_range``: the organs' known extent ``[z0, z1)`` on
        the query's own slice axis (else estimated per organ); ``source`` names the query in errors.

        ``organs[value]``: ``voxels``, ``volume_ml``, ``slice_range`` ([first, last] slice of the label map
        holding it, or None), ``extent`` (the query slices segmented, [first, last], or None when the first
        pass found nothing), ``extent_source`` ('given' or 'estimated'), ``support_slices`` (per chunk: the
        support slice and the query slices [first, last] it segmented).
        """
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        check_scan(query, source)
        frame = to_model_frame(
            query, self.preset, self.image_size, layout_map(query, self.preset, reorient), source
        )
        depth = len(frame.slices)
        given = None if query_range is None else self._model_range(frame, query_range, source)
        first, last = given if given is not None else (0, depth)
        timings["preprocess"] = time.perf_counter() - clock

        clock = time.perf_counter()
        feats, thresholds = self.encode_slices(frame.slices[first:last])  # once for every organ and pass
        timings["encode"] = time.perf_counter() - clock

        clock = time.perf_counter()
        mid = self.n_part // 2
        organ_probs, organs = {}, {}
        for value, organ in support.organs.items():
            probs = np.zeros(frame.slices.shape, dtype=np.float32)
            first_pass = None
            if given is None:
                first_pass = self.predict(organ.encoded.episode(mid), feats, thresholds)
                found = (first_pass > 0.5).sum(axis=(1, 2)).max() >= PRESENCE_FRACTION * organ.min_area
                length = round(organ.length_mm / frame.geometry.spacing[2])
                extent = estimate_extent(first_pass.sum(axis=(1, 2)), length) if found else None
            else:
                extent = (0, last - first)  # positions among the encoded slices
            chunks = []
            if extent is not None:
                for k, (a, b) in enumerate(chunk_bounds(extent[1] - extent[0], self.n_part)):
                    a, b = a + extent[0], b + extent[0]
                    if b <= a:
                        continue
                    if first_pass is not None and k == mid:
                        probs[first + a : first + b] = first_pass[a:b]
                    else:
                        probs[first + a : first + b] = self.predict(
                            organ.encoded.episode(k), feats[a:b], thresholds[a:b]
                        )
                    chunks.append((organ.source_slices[k], first + a, first + b))
            organ_probs[value] = probs
            organs[value] = {
                "extent_source": "estimated" if given is None else "given",
                "extent": None
                if extent is None
                else self._source_span(frame, first + extent[0], first + extent[1]),
                "support_slices": [
                    {"support_slice": s, "query_slices": self._source_span(frame, a, b)} for s, a, b in chunks
                ],
            }
        timings["predict"] = time.perf_counter() - clock

        clock = time.perf_counter()
        labels = list(support.organs)
        label_map = combine_labels(
            ((value, frame.to_source(organ_probs.pop(value))) for value in labels), query.shape, labels
        )
        timings["to_query_grid"] = time.perf_counter() - clock

        for value in labels:
            mask = label_map == value
            voxels = int(np.count_nonzero(mask))
            present = np.flatnonzero(mask.any(axis=(1, 2)))
            organs[value] = {
                "voxels": voxels,
                "volume_ml": voxels * query.voxel_ml,
                "slice_range": None if present.size == 0 else [int(present[0]), int(present[-1])],
                **organs[value],
            }
        return Segmentation(label_map, query.geometry, organs, timings)

    @staticmethod
    def _source_span(frame: ModelFrame, a: int, b: int) -> list[int]:
        """Model slices ``[a, b)`` as [first, last] indices along the scan's own corresponding axis."""
        ends = sorted(frame.axis_map.source_slice(k, frame.source_shape) for k in (a, b - 1))
        return ends

    def segment(
        self,
        support_image: sitk.Image | Volume,
        support_label: sitk.Image | Volume,
        labels: Sequence[int],
        queries: Sequence[sitk.Image | Volume],
        query_ranges: Sequence[tuple[int, int] | None] | None = None,
        reorient: bool = True,
    ) -> list[tuple[sitk.Image | Volume, Segmentation]]:
        """Segment ``labels`` of the support in every query (module docstring).

        Takes SimpleITK images or :class:`Volume` objects; returns per query ``(label map, Segmentation)``,
        the label map of the query's type on exactly its grid. ``query_ranges``: per query a known extent
        ``(z0, z1)`` on its slice axis, or None to estimate it.
        """
        if query_ranges is None:
            query_ranges = [None] * len(queries)
        if len(query_ranges) != len(queries):
            raise ValueError(
                f"query_ranges: expected {len(queries)} entries (one per query), got {len(query_ranges)}"
            )
        support = self.prepare_support(
            as_volume(support_image, "support image"),
            as_volume(support_label, "support label"),
            labels,
            reorient,
        )
        results = []
        for index, (query, query_range) in enumerate(zip(queries, query_ranges, strict=True)):
            result = self.segment_volume(
                support, as_volume(query, f"query {index}"), query_range, reorient, f"query {index}"
            )
            label_map = Volume(result.label_map, result.geometry)
            results.append((label_map.to_sitk() if isinstance(query, sitk.Image) else label_map, result))
        return results


def as_volume(image: sitk.Image | Volume, what: str) -> Volume:
    """A :class:`Volume` from a SimpleITK image or a Volume (a ``TypeError`` for anything else)."""
    if isinstance(image, Volume):
        return image
    if isinstance(image, sitk.Image):
        return Volume.from_sitk(image, what)
    raise TypeError(f"{what}: expected a SimpleITK image or an inference.Volume, got {type(image).__name__}")


def segment(
    checkpoint: str | os.PathLike,
    support_image: sitk.Image | Volume,
    support_label: sitk.Image | Volume,
    labels: Sequence[int],
    queries: Sequence[sitk.Image | Volume],
    query_ranges: Sequence[tuple[int, int] | None] | None = None,
    preset: str | None = None,
    reorient: bool = True,
    **options: Any,
) -> list[tuple[sitk.Image | Volume, Segmentation]]:
    """One call: load ``checkpoint`` (:meth:`Segmenter.from_checkpoint`) and segment the queries
    (:meth:`Segmenter.segment`). ``options``: ``device``, ``precision``, ``batch_size``, ``n_part``, ..."""
    segmenter = Segmenter.from_checkpoint(checkpoint, preset=preset, **options)
    return segmenter.segment(support_image, support_label, labels, queries, query_ranges, reorient)
