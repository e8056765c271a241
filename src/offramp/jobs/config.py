"""The typed configuration of one ``offramp train`` run, and reading it from YAML or JSON.

YAML lives only here, at the edge: :func:`load_config` parses the file and
:meth:`TrainConfig.from_dict` checks every key and type (unknown keys are refused with the list
of valid ones and the closest match), so the rest of offramp only sees the dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from offramp._values import to_bool, to_float, to_int
from offramp.data.splits import DATASETS
from offramp.errors import ConfigError
from offramp.training.loop import FitConfig

__all__ = [
    "DATASETS",
    "TrainConfig",
    "check_output_dir",
    "did_you_mean",
    "load_config",
    "read_mapping",
    "require_yaml",
    "typed_fields",
]


@dataclass
class TrainConfig:
    """Everything one ``offramp train`` run needs; the YAML/JSON config file holds these keys.

    Attributes:
        strategy: training strategy, any name in
            :data:`offramp.training.registry.STRATEGIES` (``joint``, ``distill`` …).
        options: the strategy's own settings (see
            :data:`offramp.training.registry.OPTIONS`), passed as ``options=`` to
            :func:`offramp.training.train`.
        dataset: ``"digits"`` (scikit-learn, 8×8), ``"mnist"`` or ``"fashion-mnist"`` (28×28
            IDX files).
        data_dir: for ``mnist`` / ``fashion-mnist``, the directory holding the IDX files;
            default ``$OFFRAMP_DATA/<dataset>``. Must be unset for ``digits``.
        train_limit: keep only the first ``train_limit`` training samples (before the
            validation split is held out of them); ``None`` keeps all.
        val_fraction: share of the training samples held out, stratified by class and seeded
            by ``seed``, to report per-exit validation accuracy after every epoch; ``0`` for
            none. For ``digits`` the test split is a fixed stratified 20 % of the 1,797 images.
        backbone: reference network, a name in :data:`offramp.models.BACKBONES` (``blenet``,
            ``mlp``, ``resnet``, ``vgg``, ``vit``).
        exits: block indices that carry early exits (``blenet``: any of 0, 1, 2; ``resnet``:
            0 … 5); ``None`` keeps the backbone's default. ``mlp`` has an exit after every
            hidden layer and accepts no ``exits``; ``vgg``: 0 (the stem, its default) or 1.
        head: head of the early exits, a name in :data:`offramp.heads.HEADS`; ``None`` keeps
            the backbone's default (``conv`` for ``blenet``, ``linear`` for ``mlp``, ``pool``
            for ``resnet``, ``linear`` for ``vgg``, ``cls`` for ``vit``).
        epochs: passes over the training data. On resume it may grow (the run continues to
            the new total) unless the training depends on the total — ``lr_schedule``
            ``cosine``, the λ schedule ``sdn``, ``freezeout``, and the stage-by-stage
            strategies ``layerwise``, ``ib`` and ``heads``, where extending would change the
            epochs already trained: those need a new ``output_dir``. It never shrinks below
            the epochs trained (see ``configs/README.md``).
        batch_size: samples per optimiser step (global: split over ranks under DDP).
        lr: learning rate.
        weight_decay: L2 penalty (decoupled for Adam: AdamW).
        optimizer: ``"adam"`` (AdamW) or ``"sgd"`` (with momentum).
        lr_schedule: ``"constant"`` or ``"cosine"``.
        seed: seeds the validation split, initialisation and training.
        output_dir: where the run writes its files (see the module docstring); not empty.
        resume: continue from ``output_dir/checkpoint.pt`` when it exists.
        show_progress: show a progress bar per epoch.

    Example:
        >>> cfg = TrainConfig.from_dict({"strategy": "distill", "epochs": 3, "lr": "3e-3"})
        >>> cfg.epochs, cfg.lr, cfg.backbone
        (3, 0.003, 'blenet')
    """

    strategy: str = "joint"
    options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    train_limit: int | None = None
    val_fraction: float = 0.1
    backbone: str = "blenet"
    exits: list[int] | None = None
    head: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    seed: int = 0
    output_dir: str = "runs/train"
    resume: bool = True
    show_progress: bool = True

    def __post_init__(self) -> None:
        from offramp.heads import HEADS
        from offramp.models import BACKBONES
        from offramp.training.registry import OPTIONS, STRATEGIES, coerce_options

        _choice("strategy", self.strategy, STRATEGIES)
        _choice("dataset", self.dataset, DATASETS)
        _choice("backbone", self.backbone, tuple(BACKBONES))
        _choice("optimizer", self.optimizer, ("adam", "sgd"))
        _choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        if self.head is not None:
            _choice("head", self.head, tuple(sorted(HEADS)))
        allowed = OPTIONS.get(self.strategy, ())
        for key in self.options:
            if key not in allowed:
                raise ConfigError(
                    f"strategy {self.strategy!r} does not take option {key!r}"
                    f"{did_you_mean(key, allowed)}; it takes {list(allowed)}"
                )
        self.options = coerce_options(self.strategy, self.options)
        limit_ok = self.train_limit is None or self.train_limit >= 2
        for name, value, ok, want in (
            ("epochs", self.epochs, self.epochs >= 1, "≥ 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "≥ 1"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, "≥ 0"),
            ("val_fraction", self.val_fraction, 0 <= self.val_fraction < 1, "in [0, 1)"),
            ("train_limit", self.train_limit, limit_ok, "≥ 2 or null"),
        ):
            if not ok:
                raise ConfigError(f"{name} must be {want}, got {value!r}")
        check_output_dir(self.output_dir)
        if self.exits is not None and len(set(self.exits)) != len(self.exits):
            raise ConfigError(f"exits lists a block twice: {self.exits}")
        if self.dataset == "digits" and self.data_dir is not None:
            raise ConfigError(
                "dataset 'digits' comes with scikit-learn and reads no files; remove data_dir"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build a config from a mapping (a parsed YAML/JSON file), checking keys and types.

        Numbers written as strings (YAML reads ``1e-3`` as a string) are converted.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones), a value of the
                wrong type, or an invalid value.

        Example:
            >>> TrainConfig.from_dict({"epoch": 5})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            offramp.errors.ConfigError: unknown config key 'epoch' (did you mean 'epochs'?); ...
        """
        return cls(**typed_fields(cls, d, "a training config"))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain Python values (what :meth:`from_dict` reads back).

        Example:
            >>> TrainConfig.from_dict(TrainConfig(epochs=2).to_dict()) == TrainConfig(epochs=2)
            True
        """
        d = asdict(self)
        d["options"] = dict(self.options)
        return d

    def fit_config(self) -> FitConfig:
        """The :class:`~offramp.training.loop.FitConfig` of this run (checkpoint in
        ``output_dir``)."""
        return FitConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            optimizer=self.optimizer,
            lr_schedule=self.lr_schedule,
            seed=self.seed,
            checkpoint=str(Path(self.output_dir) / "checkpoint.pt"),
            resume=self.resume,
            show_progress=self.show_progress,
        )


def typed_fields(cls: type, d: Any, what: str) -> dict[str, Any]:
    """The keys of mapping ``d`` checked against dataclass ``cls``'s fields and converted to
    their annotated types (numbers written as strings included), or a ConfigError naming the
    bad key and listing the valid ones."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} is a mapping of keys to values, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key not in names:
            raise ConfigError(
                f"unknown config key {key!r}{did_you_mean(str(key), names)}; valid keys are {names}"
            )
        kwargs[key] = _convert(key, value, hints[key])
    return kwargs


def check_output_dir(output_dir: str) -> None:
    """``ConfigError`` for an empty ``output_dir``: the run's files would land in the current
    directory, among whatever else is there."""
    if not output_dir.strip():
        raise ConfigError(
            f"output_dir is empty ({output_dir!r}): the run would write its files into the "
            "current directory; give a directory of its own, e.g. runs/my_run"
        )


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``word``, else ``""``.

    Example:
        >>> did_you_mean("epoch", ["epochs", "lr"])
        " (did you mean 'epochs'?)"
    """
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(
            f"unknown {name} {value!r}{did_you_mean(str(value), choices)}; choose one of "
            f"{list(choices)}"
        )


def _convert(key: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (the field's annotation), or a ConfigError naming ``key``."""
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        if value is None:
            return None
        (tp,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key {key!r} must be {_type_name(tp)}, got {value!r}")
    if tp is bool or tp is int or tp is float:
        convert = {bool: to_bool, int: to_int, float: to_float}[tp]
        try:
            return convert(value)
        except (TypeError, ValueError):
            raise bad from None
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)
        return [_convert(f"{key}[{k}]", v, item) for k, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        return dict(value)
    raise AssertionError(f"no converter for {key}: {tp}")  # pragma: no cover


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def require_yaml() -> Any:
    """The ``yaml`` module, or a ConfigError saying how to install it."""
    try:
        import yaml
    except ImportError as exc:
        raise ConfigError(
            "reading or writing YAML needs pyyaml: pip install 'offramp[config]' (or use a "
            ".json config)"
        ) from exc
    return yaml


class _DuplicateKey(Exception):
    """A mapping in a config file sets ``key`` twice (``where``: the lines, when known)."""

    def __init__(self, key: Any, where: str = "") -> None:
        super().__init__(key)
        self.key = key
        self.where = where


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of :func:`json.loads`: a dict, or :class:`_DuplicateKey`."""
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


def _check_unique_keys(node: Any) -> None:
    """Raise :class:`_DuplicateKey` for a mapping in the composed YAML ``node`` tree that sets a
    key it already holds (a parser would silently keep the last value). Keys merged in with
    ``<<`` may still be overridden: that is what merging is for."""
    value = getattr(node, "value", None)
    if not isinstance(value, list):  # a scalar
        return
    seen: dict[tuple[str, Any], int] = {}
    for item in value:
        key_node, child = item if isinstance(item, tuple) else (None, item)
        if key_node is not None and key_node.tag != "tag:yaml.org,2002:merge":
            key = (
                key_node.tag,
                key_node.value if isinstance(key_node.value, str) else id(key_node),
            )
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key_node.value, f" (lines {seen[key]} and {line})")
            seen[key] = line
        _check_unique_keys(child)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.yaml`` / ``.yml`` (needs pyyaml) or ``.json`` file (empty: ``{}``).

    Raises:
        ConfigError: naming the file, when it is missing or a directory, is not UTF-8 text,
            does not parse, sets a key twice in one mapping, or holds no mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"config {path} is a directory, not a file; give the path of a .yaml, .yml or "
            ".json config file"
        )
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(
            f"config {path} must end in .yaml, .yml or .json (the suffix picks the parser)"
        )
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        if suffix == ".json":
            try:
                data = json.loads(text, object_pairs_hook=_unique_pairs) if text.strip() else {}
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        else:
            yaml = require_yaml()
            try:
                _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader))
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{path} sets key {dup.key!r} twice in one mapping{dup.where}; keep one of them "
            "(the parser would silently use the last)"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path) -> TrainConfig:
    """Read a :class:`TrainConfig` from a ``.yaml`` / ``.yml`` (needs pyyaml) or ``.json`` file.

    An empty file gives the defaults.

    Example:
        >>> import json, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = Path(d) / "run.json"
        ...     _ = p.write_text(json.dumps({"epochs": 2, "strategy": "distill"}))
        ...     load_config(p).strategy
        'distill'
    """
    data = read_mapping(path)
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


# ----------------------------------------------------------------------------------- data
