"""Apply a trained model (of any method) to a user's own scans: one labelled support, any number of queries.

:class:`Segmenter` holds the model, its preset (:mod:`inference.presets`) and the run settings. A query goes
through the four stages once each (:meth:`Segmenter.segment_volume`)::

    scans (check)  →  frames (into the model's frame)  →  prediction (probabilities)  →  label_maps (back)

and :meth:`Segmenter.segment` takes SimpleITK images or :class:`~dataloaders.volume.Volume` objects and
returns, per query, a label map on exactly the query's grid (same type as given) with per-organ figures.
The support goes through the same stages up to its encoding (:meth:`Segmenter.prepare_support`), once for
every query. bfloat16 autocast and channels-last convolutions are the defaults on CUDA.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import inference.frames as frames
import inference.label_maps as label_maps
import inference.prediction as prediction
import inference.scans as scans
from dataloaders import Volume
from engine.runtime import apply_memory_format, check_precision, warn_emulated_bf16
from inference.label_maps import Segmentation
from inference.prediction import DEFAULT_BATCH_SIZE, ModelRunner, PreparedSupport
from inference.presets import DATASET_PRESETS, Preset, get_preset, sitk
from inference.segmentations import SupportLabel
from models import load_model
from utils import resolve_device


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself: path, SHA-256, the method and its options the model was built
    with, and for our snapshots their step and config."""

    path: Path
    sha256: str
    config: dict[str, Any] | None
    step: int | None
    method: str
    options: dict[str, Any]

    def report(self) -> dict[str, Any]:
        keys = ("dataset", "image_size", "eval_fold", "setting", "use_gt")
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "step": self.step,
            "method": self.method,
            "options": self.options,
            "config": None if self.config is None else {k: self.config.get(k) for k in keys},
        }


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Segmenter:
    """A model ready for inference on a preset's kind of scan.

    Args:
        model: the network of a registered method (weights loaded; :mod:`models.methods` says what it
            provides); moved to ``device`` and put in ``eval()`` mode.
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
        model: torch.nn.Module,
        preset: str | Preset,
        image_size: int | None = None,
        device: str | torch.device = "auto",
        precision: str | None = None,
        channels_last: bool | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        n_part: int = 3,
        checkpoint: CheckpointInfo | None = None,
    ) -> None:
        device = device if isinstance(device, torch.device) else resolve_device(device)
        on_cuda = device.type == "cuda"
        precision = check_precision(precision or ("bf16" if on_cuda else "fp32"))
        warn_emulated_bf16(precision, device)
        channels_last = on_cuda if channels_last is None else channels_last
        if image_size is not None and (
            isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1
        ):
            raise ValueError(f"image_size: expected None or a positive integer, got {image_size!r}")
        if int(batch_size) < 1 or int(n_part) < 1:
            raise ValueError(f"batch_size and n_part must be positive, got {batch_size} and {n_part}")
        self.preset = get_preset(preset)
        self.image_size = None if image_size is None else int(image_size)
        self.n_part = int(n_part)
        self.checkpoint = checkpoint
        model = apply_memory_format(model.to(device), channels_last).eval()
        self.runner = ModelRunner(model, device, precision, channels_last, int(batch_size))

    # Settings, for reports.
    device = property(lambda self: self.runner.device)
    precision = property(lambda self: self.runner.precision)
    channels_last = property(lambda self: self.runner.channels_last)
    batch_size = property(lambda self: self.runner.batch_size)
    model = property(lambda self: self.runner.model)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, preset: str | None = None, method: str | None = None, **options: Any
    ) -> Segmenter:
        """Build and load the model a checkpoint holds (:func:`models.load_model`: the method a snapshot
        records, or the one whose network a plain state dict is; ``method`` names it, and must then agree;
        the architecture is read off the weights, which must agree with the config a snapshot records).

        ``preset`` defaults to the dataset the snapshot records; an official state dict records none, so it
        needs one. The working size is the snapshot's ``image_size``. ``options``: the other arguments of
        :class:`Segmenter`.
        """
        path = Path(path)
        model, checkpoint = load_model(path, method)
        config = checkpoint.config or {}
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
        info = CheckpointInfo(
            path,
            sha256_of(path),
            checkpoint.config,
            checkpoint.step,
            checkpoint.built_method,
            checkpoint.built_options,
        )
        return cls(model, preset, image_size=config.get("image_size"), checkpoint=info, **options)

    def prepare_support(
        self,
        image: Volume,
        label: Volume | SupportLabel,
        labels: Sequence[int],
        reorient: bool = True,
        sources: tuple[str, str] = ("support image", "support label"),
    ) -> PreparedSupport:
        """Check the support, bring it into the model's frame and encode ``n_part`` slices per organ
        (:func:`inference.prediction.encode_support`). ``label``: a label map on the image's grid or a
        voxel-aligned part of it, or a :class:`~inference.segmentations.SupportLabel` (a Slicer
        segmentation's segments; ``labels`` is then unused). ``sources`` name the image and the label in
        errors."""
        start = time.perf_counter()
        label = scans.check_support(image, label, labels, sources)
        frame, label_masks = frames.support_to_model_frame(
            image,
            label,
            self.preset,
            self.image_size,
            self.preset.layout(image.geometry.direction, reorient),
            sources[0],
        )
        organs = prediction.encode_support(
            self.runner, frame, label_masks, self.n_part, self.image_size, sources[1]
        )
        return PreparedSupport(organs, time.perf_counter() - start)

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

        ``organs[value]``: ``voxels``, ``volume_ml``, ``slice_range``, ``extent``, ``extent_source`` and
        ``support_slices`` (:func:`inference.label_maps.to_label_map`).
        """
        clock = time.perf_counter()
        layout = self.preset.layout(query.geometry.direction, reorient)
        query_range = scans.check_query(query, query_range, layout, source)
        frame = frames.to_model_frame(query, self.preset, self.image_size, layout, source)
        timings = {"preprocess": time.perf_counter() - clock}
        organ_probs, placements, stage = prediction.predict_organs(
            self.runner, support, frame, query_range, self.n_part
        )
        clock = time.perf_counter()
        result = label_maps.to_label_map(organ_probs, placements, frame, query)
        result.timings = {**timings, **stage, "to_query_grid": time.perf_counter() - clock}
        return result

    def segment(
        self,
        support_image: sitk.Image | Volume,
        support_label: sitk.Image | Volume | SupportLabel,
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
        if not isinstance(support_label, SupportLabel):
            support_label = scans.as_volume(support_label, "support label")
        support = self.prepare_support(
            scans.as_volume(support_image, "support image"),
            support_label,
            labels,
            reorient,
        )
        results = []
        for index, (query, query_range) in enumerate(zip(queries, query_ranges, strict=True)):
            result = self.segment_volume(
                support, scans.as_volume(query, f"query {index}"), query_range, reorient, f"query {index}"
            )
            label_map = Volume(result.label_map, result.geometry)
            results.append((label_map.to_sitk() if isinstance(query, sitk.Image) else label_map, result))
        return results


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
