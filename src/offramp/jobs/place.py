"""``offramp place CONFIG``: where should the exits go, answered with numbers.

The config holds a ``train`` mapping — an ``offramp train`` config (:class:`TrainConfig`) for
the backbone, trained with its final exit only (or resumed when already trained) — and the
placement settings of :class:`PlaceConfig`. The run then puts a head at every candidate block,
trains the heads on the frozen backbone (the quick estimate of ``γ_i``), measures the cost
profile (FLOPs, parameters, bytes of every ``h_i``, and seconds per sample at batch 1 and at
``batch_size``), runs every placement rule calibrated on the validation split, reports each on
the test split, and writes into ``output_dir``:

===================  ==========================================================================
``backbone/``        the backbone's ``offramp train`` run (resumable)
``candidates.pt``    the trained candidate heads (reused by a rerun on the same backbone)
``placement.json``   config, cost profile, per-candidate accuracy, every rule's recommendation
``placement.png``    expected cost vs accuracy of each rule, beside every exhaustive subset's
===================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from offramp.errors import ConfigError, DataError
from offramp.files import read_torch, save_torch, write_json
from offramp.jobs.config import TrainConfig, check_output_dir, read_mapping, typed_fields
from offramp.placement.estimate import (
    COSTS,
    cost_table,
    format_cost_table,
    train_candidate_heads,
    with_candidate_exits,
)
from offramp.placement.place import RULES, place, placement_table
from offramp.placement.problem import Candidates
from offramp.placement.rules import SDN_FRACTIONS

__all__ = ["PlaceConfig", "format_placement", "load_place_config", "run_placement"]


@dataclass(frozen=True)
class PlaceConfig:
    """Everything one ``offramp place`` run needs; the config file holds these keys.

    Attributes:
        train: the backbone's ``offramp train`` config (``exits`` and ``output_dir`` are
            ignored: the backbone trains with its final exit only, into
            ``output_dir/backbone``).
        candidates: candidate blocks; ``null`` = every block boundary.
        head: head zoo name for the candidates.
        head_epochs: epochs of each candidate head on the frozen backbone.
        head_train_limit: training samples the candidate heads see (``null`` = all).
        criterion: confidence criterion of the shared-threshold policy.
        target_drop: accuracy drop allowed against the final exit, percentage points.
        cost: ``flops`` or ``latency`` (measured seconds per sample at ``batch_size``).
        batch_size: batch for the latency profile.
        rules: placement rules to run.
        fractions: cost fractions of the ``flops_spacing`` rule.
        max_ratio: greedy rule: bound on the compression ratio.
        min_accuracy_ratio: greedy rule: bound on accuracy relative to the final exit.
        min_gain: greedy rule: accuracy (fraction) an exit must add over the previous one.
        output_dir: where the results go.
    """

    train: dict[str, Any] = field(default_factory=dict)
    candidates: list[int] | None = None
    head: str = "pool"
    head_epochs: int = 2
    head_train_limit: int | None = 10_000
    criterion: str = "max_prob"
    target_drop: float = 0.5
    cost: str = "flops"
    batch_size: int = 256
    rules: list[str] = field(default_factory=lambda: list(RULES))
    fractions: list[float] = field(default_factory=lambda: list(SDN_FRACTIONS))
    max_ratio: float = 0.05
    min_accuracy_ratio: float = 0.9
    min_gain: float = 0.005
    output_dir: str = "runs/place"

    def __post_init__(self) -> None:
        from offramp.heads import HEADS
        from offramp.policies import CRITERIA

        checks = (
            ("cost", self.cost in COSTS, f"one of {list(COSTS)}"),
            ("head", self.head in HEADS, f"one of {sorted(HEADS)}"),
            ("criterion", self.criterion in CRITERIA, f"one of {sorted(CRITERIA)}"),
            ("rules", set(self.rules) <= set(RULES) and self.rules, f"a list from {list(RULES)}"),
            ("target_drop", 0 <= self.target_drop < 100, "in [0, 100) percentage points"),
            ("head_epochs", self.head_epochs >= 1, "≥ 1"),
            ("batch_size", self.batch_size >= 1, "≥ 1"),
        )
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"{name} must be {want}, got {getattr(self, name)!r}")
        check_output_dir(self.output_dir)
        cfg = self.train_config()
        if cfg.val_fraction <= 0:
            raise ConfigError(
                "placement calibrates on the validation split: give train.val_fraction > 0"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlaceConfig:
        """Build from a mapping (a parsed YAML/JSON file), checking keys and types."""
        return cls(**typed_fields(cls, d, "a placement config"))

    def train_config(self) -> TrainConfig:
        """The backbone's training config: final exit only, in ``output_dir/backbone``."""
        d = {**self.train, "exits": [], "output_dir": str(Path(self.output_dir) / "backbone")}
        try:
            cfg = TrainConfig.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"train: {exc}") from exc
        if cfg.backbone == "mlp":
            raise ConfigError(
                "backbone 'mlp' carries an exit after every hidden layer by construction; "
                "use 'blenet' or 'resnet' for placement"
            )
        return cfg


def load_place_config(path: str | Path) -> PlaceConfig:
    """Read a :class:`PlaceConfig` from YAML or JSON."""
    data = read_mapping(path)  # its errors name the file already
    try:
        return PlaceConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def run_placement(cfg: PlaceConfig, *, config_path: str | Path | None = None) -> dict[str, Any]:
    """Train (or resume) the backbone, estimate every candidate and run every rule
    (``config_path``: the file ``cfg`` was read from, named by errors in its ``train``).

    Returns:
        What ``placement.json`` holds.
    """
    from offramp.evaluation import record_splits
    from offramp.jobs.train import load_datasets, load_model, run_training

    out = Path(cfg.output_dir)
    tcfg = cfg.train_config()
    run_training(tcfg, config_path=None if config_path is None else f"{config_path}: train")
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_model(Path(tcfg.output_dir) / "model.pt")
    splits = load_datasets(tcfg)
    cand = with_candidate_exits(backbone, cfg.head, cfg.candidates, seed=tcfg.seed)
    cand_path = out / "candidates.pt"
    # heads trained on these very backbone weights, for this candidate set, are reused
    weights = hashlib.sha256((Path(tcfg.output_dir) / "model.pt").read_bytes()).hexdigest()
    key = json.dumps([weights, cfg.head, cand.exit_blocks, cfg.head_epochs,
                      cfg.head_train_limit, tcfg.batch_size, tcfg.lr, tcfg.seed])  # fmt: skip
    try:  # a cache: an unreadable file is retrained over
        saved = read_torch(cand_path) if cand_path.is_file() else None
    except DataError:
        saved = None
    early = cand.heads[:-1]
    if isinstance(saved, dict) and saved.get("key") == key:
        early.load_state_dict(saved["heads"])  # the heads only: the backbone is model.pt's
    else:
        train_candidate_heads(
            cand,
            splits.train,
            epochs=cfg.head_epochs,
            limit=cfg.head_train_limit,
            batch_size=tcfg.batch_size,
            lr=tcfg.lr,
            seed=tcfg.seed,
            show_progress=tcfg.show_progress,
        )
        save_torch(cand_path, {"key": key, "heads": early.state_dict()})
    cand.eval()
    x = splits.val[0][: cfg.batch_size]
    rows = cost_table(cand, x)
    # placement's costs come from the profile just printed: FLOPs, or seconds at the user batch
    block_col, head_col, scale, unit = (
        ("block_flops", "head_flops", 1.0, "flops")
        if cfg.cost == "flops"
        else ("block_ms_per_sample", "head_ms_per_sample", 1e-3, "seconds")
    )
    cands = Candidates(
        tuple(cand.exit_blocks),
        scale * np.array([r[block_col] for r in rows], dtype=np.float64),
        scale * np.array([r[head_col] for r in rows if r[head_col] is not None], dtype=np.float64),
        unit,
    )
    val, test = record_splits(cand, splits.val, splits.test)
    placements = place(
        cands,
        val,
        test,
        criterion=cfg.criterion,
        delta=cfg.target_drop / 100,
        rules=cfg.rules,
        fractions=cfg.fractions,
        max_ratio=cfg.max_ratio,
        min_accuracy_ratio=cfg.min_accuracy_ratio,
        min_gain=cfg.min_gain,
    )
    final = float(test.correct()[-1].double().mean())
    result: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "cost": cfg.cost,
        "final_accuracy": final,
        "profile": rows,
        "candidates": [
            {"block": b, "val_accuracy": float(a), "test_accuracy": float(t)}
            for b, a, t in zip(
                cand.exit_blocks, val.exit_accuracy(), test.exit_accuracy(), strict=True
            )
        ],
        "rows": [p.to_dict() for p in placements],
    }
    result["json"] = str(out / "placement.json")
    result["plot"] = str(_plot(placements, cands, val, cfg, out / "placement.png"))
    write_json(result["json"], result)
    return result


def _plot(placements: Any, cands: Any, val: Any, cfg: PlaceConfig, path: Path) -> Path:
    from offramp.report import plot_placement

    subsets: list[tuple[float, float]] = []
    if cands.num - 1 <= 12:
        from offramp.placement.problem import PlacementRecord, operating_points

        rec = PlacementRecord.from_exit_record(val, cfg.criterion)
        pts = operating_points(cands, rec, np.arange(1 << (cands.num - 1)), cfg.target_drop / 100)
        subsets = [(p.cost, p.accuracy) for p in pts]
    return plot_placement(
        [(p.rule, p.cost, p.accuracy) for p in placements],
        path,
        subsets=subsets,
        unit=cands.unit,
        target_drop=cfg.target_drop,
    )


def format_placement(r: dict[str, Any]) -> str:
    """The candidates, the cost profile and every rule's recommendation, as text."""
    from offramp.placement.place import Placement
    from offramp.report import format_table

    prof = format_cost_table(r["profile"])
    # γ_i: share of test samples leaving at each candidate when all of them are exits
    every = next((row for row in r["rows"] if row["rule"] == "all"), None)
    gamma = every["exit_fractions"] if every else [None] * len(r["candidates"])
    cands = format_table(
        ["candidate block", "val accuracy %", "test accuracy %", "γ (rule all)"],
        [
            [
                c["block"],
                f"{100 * c['val_accuracy']:.2f}",
                f"{100 * c['test_accuracy']:.2f}",
                "—" if g is None else f"{g:.3f}",
            ]
            for c, g in zip(r["candidates"], gamma, strict=True)
        ],
    )
    fields = {f.name for f in dataclasses.fields(Placement)}
    rows = [Placement(**{k: v for k, v in row.items() if k in fields}) for row in r["rows"]]
    return "\n\n".join(
        [
            "cost profile (per sample)\n" + prof,
            "candidates\n" + cands,
            f"placement (cost in {r['cost']}, relative to the plain backbone; calibrated on "
            "validation, reported on test)\n" + placement_table(rows, r["final_accuracy"]),
            f"written to {r['json']} and {r['plot']}",
        ]
    )
