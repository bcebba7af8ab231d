"""A few-shot segmentation method as a plug-in: what the harness asks of a method, and the registry.

The harness (``train.py``, ``test.py``, ``segment.py``, the label-free validation, snapshots, the grid and
the report) never names a method. It asks the :class:`Method` registered under the config key ``method``:

* ``build(options, pretrained_weights, pretrained_path)``: the network, an ``nn.Module`` with

  - ``forward(supp_imgs, supp_masks, qry_imgs)``: ``(B, S, 3, H, W)``, ``(B, S, H, W)`` in {0, 1},
    ``(B, Q, 3, H, W)`` → a :class:`FewShotOutput` (its ``query_probs (B, Q, 2, H, W)`` are the [bg, fg]
    probabilities; in training mode it also holds what the loss needs);
  - ``encode_support(supp_imgs, supp_masks)`` → a support encoding with ``episode(i)`` (episode ``i`` alone),
    computed once per support by ``segment.py``;
  - ``encode_queries(imgs)``: ``(N, 3, H, W)`` → a tuple of tensors, each with the slices on dimension 0;
  - ``segment_encoded(support, *queries)``: the query tensors as ``(B, Q, ...)`` → ``(B, Q, 2, H, W)``;
  - ``unused_parameters``: names of parameters the forward never uses (kept so that official checkpoints
    load); they are frozen for DistributedDataParallel;

* ``loss(weights, options)``: an ``nn.Module`` mapping ``(output, qry_labels (B, Q, H, W), supp_masks)`` to
  a dict of 0-d tensors: every term of ``loss_weights`` and their weighted sum ``total``;
* ``options``: the method's own config keys (:class:`Option`), which exist only when the method is chosen;
* ``official_script``: the method's official schedule and evaluation settings (the named config
  ``official_script`` applies those of the chosen method);
* ``architecture_of(state)``: the options a state dict of this method needs (read off its tensors), or a
  ``ValueError`` when the tensors are not this method's; ``describe_state(state)``, optional, says in
  words what such a state dict is (load errors); the network's ``official_extras`` (``{name: values}``)
  lists the entries an official checkpoint holds that are no parameters of ours (a loss module's buffers),
  checked and dropped when one is loaded.

Methods register themselves (:func:`register`); the built-in ones when ``models`` is imported, others from
their own files or modules named in the config key ``plugins`` (:func:`load_plugins`). ``docs/methods.md``
says how to add one.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

#: The method of a config that names none (and of snapshots written before methods were plug-ins).
DEFAULT_METHOD = "difd"
#: Kinds of pseudo-label a method trains on (the training dataset's ``pseudo_labels``).
PSEUDO_LABELS = ("supervoxels_3d", "superpixels_2d")


@dataclass
class FewShotOutput:
    """Base of every method's output: ``query_probs (B, Q, 2, H, W)``, the [bg, fg] probabilities."""

    query_probs: Tensor

    def float(self) -> FewShotOutput:
        """The same output with every floating-point tensor in float32 (the losses run in float32 after a
        bfloat16 forward)."""
        changes = {
            f.name: value.float()
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), Tensor) and value.is_floating_point()
        }
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Option:
    """One config key of a method: its default, what values it takes (``check``, described by
    ``expected`` in errors), and which commands read it (``'train'``, ``'test'``). ``follows``, when given,
    makes the config default a function of the base config's ``image_size`` and ``dataset`` (e.g. a layer
    width tied to the slice size); ``default`` stays the default of a file that records none."""

    default: Any
    check: Callable[[Any], bool]
    expected: str
    doc: str
    used_by: tuple[str, ...] = ("train", "test")
    follows: Callable[[Mapping[str, Any]], Any] | None = None

    @classmethod
    def choice(cls, default: Any, choices: Iterable[Any], doc: str, **kw: Any) -> Option:
        choices = tuple(choices)
        return cls(default, lambda v: v in choices, f"one of {choices}", doc, **kw)

    @classmethod
    def flag(cls, default: bool, doc: str, **kw: Any) -> Option:
        return cls(default, lambda v: isinstance(v, bool), "True or False", doc, **kw)

    @classmethod
    def integer(cls, default: int, minimum: int, doc: str, **kw: Any) -> Option:
        def ok(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= minimum

        return cls(default, ok, f"an int >= {minimum}", doc, **kw)

    @classmethod
    def number(
        cls, default: float, minimum: float, doc: str, maximum: float | None = None, **kw: Any
    ) -> Option:
        def ok(v: Any) -> bool:
            number = isinstance(v, int | float) and not isinstance(v, bool) and v == v
            return number and v >= minimum and (maximum is None or v <= maximum)

        bounds = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        return cls(default, ok, f"a number {bounds}", doc, **kw)


@dataclass(frozen=True)
class Method:
    """A registered method (module docstring). ``name`` is the config value, ``title`` the name published
    tables use (the report matches published rows by it), ``paper`` the reference."""

    name: str
    title: str
    paper: str
    build: Callable[[Mapping[str, Any], str | None, str | None], nn.Module]
    loss: Callable[[Mapping[str, float], Mapping[str, Any]], nn.Module]
    loss_weights: Mapping[str, float]
    options: Mapping[str, Option] = field(default_factory=dict)
    official_script: Mapping[str, Any] = field(default_factory=dict)
    architecture_of: Callable[[Mapping[str, Tensor]], dict[str, Any]] | None = None
    describe_state: Callable[[Mapping[str, Tensor]], str] | None = None
    pseudo_labels: str = "supervoxels_3d"

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"method name: expected a lower-case identifier, got {self.name!r}")
        if "total" in self.loss_weights or not self.loss_weights:
            raise ValueError(f"{self.name}: loss_weights must name the loss terms ('total' is the sum)")
        if self.pseudo_labels not in PSEUDO_LABELS:
            raise ValueError(f"{self.name}: pseudo_labels must be one of {PSEUDO_LABELS}")
        clash = set(self.options) & {"loss_weights", "method", "plugins"}
        if clash:
            raise ValueError(f"{self.name}: option names {sorted(clash)} are taken by the harness")

    @property
    def loss_terms(self) -> tuple[str, ...]:
        """The logged loss terms, in order, ``total`` last."""
        return (*self.loss_weights, "total")

    def defaults(self, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The method's config keys with their defaults (``loss_weights`` included); with ``base`` (the base
        config's ``image_size`` and ``dataset``), an option that ``follows`` it takes the value it gives."""

        def default(option: Option) -> Any:
            return option.follows(base) if base is not None and option.follows else option.default

        return {"loss_weights": dict(self.loss_weights)} | {k: default(o) for k, o in self.options.items()}

    def options_of(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """This method's options as ``config`` holds them (missing ones at their defaults)."""
        return {key: config.get(key, option.default) for key, option in self.options.items()}

    def problems(self, config: Mapping[str, Any]) -> list[str]:
        """One line per bad value of this method's keys in ``config``."""
        found = []
        for key, option in self.options.items():
            if key in config and not option.check(config[key]):
                found.append(f"{key}: expected {option.expected}, got {config[key]!r}")
        weights = config.get("loss_weights", {})
        for term, value in weights.items():
            if term not in self.loss_weights:
                found.append(
                    f"loss_weights.{term}: not a loss term of {self.name} ({list(self.loss_weights)})"
                )
            elif isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                found.append(f"loss_weights.{term}: expected a number >= 0, got {value!r}")
        return found


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a second method of the same name is an error); returns it."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order (the built-in ones first)."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(
            f"method: expected one of {list(_REGISTRY)} (or a method of a module given in plugins=[...]), "
            f"got {name!r}"
        )
    return _REGISTRY[name]


def owners_of(key: str) -> list[str]:
    """The registered methods that have the config key ``key`` (a dotted ``loss_weights.<term>`` too)."""
    return [m.name for m in _REGISTRY.values() if key in m.options or key in _dotted_weights(m)]


def _dotted_weights(method: Method) -> set[str]:
    return {f"loss_weights.{term}" for term in method.loss_weights}


def plugin_list(plugins: Iterable[str] | str | None) -> list[str]:
    """The entries of the config key ``plugins``: a list, or the text Sacred leaves for an unquoted
    ``plugins=[a.py,b.py]`` on a command line."""
    if isinstance(plugins, str):
        inner = plugins.strip().removeprefix("[").removesuffix("]")
        return [entry.strip().strip("'\"") for entry in inner.split(",") if entry.strip()]
    return list(plugins or ())


def load_plugins(plugins: Iterable[str] | str | None) -> list[str]:
    """Import the modules that register further methods: each entry a module name (``my_lab.method``) or
    the path of a ``.py`` file (:func:`plugin_list`). A user's own code, named by the user (a checkpoint
    never names one). Returns the names imported; a module that cannot be imported is a ``ValueError``
    naming it."""
    loaded = []
    for entry in plugin_list(plugins):
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"plugins: expected module names or .py paths, got {entry!r}")
        if entry.endswith(".py"):
            path = Path(entry).expanduser().resolve()
            name = f"difd_plugin_{path.stem}"
            if name not in sys.modules:
                if not path.is_file():
                    raise ValueError(f"plugins: method file not found: {path}")
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except Exception:
                    del sys.modules[name]
                    raise
        else:
            try:
                importlib.import_module(entry)
            except ImportError as err:
                raise ValueError(f"plugins: cannot import the method module {entry!r}: {err}") from err
        loaded.append(entry)
    return loaded


def check_support(supp_imgs: Tensor, supp_masks: Tensor) -> None:
    """The support of a batch of episodes, as every method takes it: ``ValueError`` for wrong ranks or
    sizes, or non-binary masks. ``supp_imgs (B, S, 3, H, W)``, ``supp_masks (B, S, H, W)``."""
    if supp_imgs.dim() != 5:
        raise ValueError(f"supp_imgs: expected (B, S, 3, H, W), got shape {tuple(supp_imgs.shape)}")
    if supp_masks.dim() != 4:
        raise ValueError(f"supp_masks: expected (B, S, H, W), got shape {tuple(supp_masks.shape)}")
    b, s, ch, h, w = supp_imgs.shape
    if b == 0 or s == 0:
        raise ValueError(
            f"supp_imgs: need B ≥ 1 episodes and S ≥ 1 shots, got shape {tuple(supp_imgs.shape)}"
        )
    if ch != 3 or h == 0 or w == 0:
        raise ValueError(f"supp_imgs: expected 3 channels and a non-empty H×W, got {tuple(supp_imgs.shape)}")
    if tuple(supp_masks.shape) != (b, s, h, w):
        raise ValueError(f"supp_masks: expected shape {(b, s, h, w)}, got {tuple(supp_masks.shape)}")
    if not supp_imgs.is_floating_point():
        raise ValueError(f"supp_imgs: expected floating point, got {supp_imgs.dtype}")
    # One host synchronisation to validate the masks at the boundary.
    if bool(((supp_masks != 0) & (supp_masks != 1)).any()):
        raise ValueError("supp_masks: expected values in {0, 1}, found other values")


def check_episode(supp_imgs: Tensor, supp_masks: Tensor, qry_imgs: Tensor) -> None:
    """A batch of episodes (:func:`check_support`, and ``qry_imgs (B, Q, 3, H, W)`` on the same image size):
    ``ValueError`` for wrong ranks, sizes, empty shot/query dimensions or non-binary masks."""
    if qry_imgs.dim() != 5:
        raise ValueError(f"qry_imgs: expected (B, Q, 3, H, W), got shape {tuple(qry_imgs.shape)}")
    check_support(supp_imgs, supp_masks)
    b, _, ch, h, w = supp_imgs.shape
    if qry_imgs.shape[0] != b or qry_imgs.shape[1] == 0:
        raise ValueError(
            f"qry_imgs: expected ({b}, Q ≥ 1, {ch}, {h}, {w}) to match supp_imgs, got {tuple(qry_imgs.shape)}"
        )
    if qry_imgs.shape[2:] != supp_imgs.shape[2:]:
        raise ValueError(
            f"images: expected 3 channels and equal sizes, got supp_imgs {tuple(supp_imgs.shape)} "
            f"and qry_imgs {tuple(qry_imgs.shape)}"
        )
    if not qry_imgs.is_floating_point():
        raise ValueError(f"qry_imgs: expected floating point, got {qry_imgs.dtype}")
