"""``offramp export RUN_DIR``: a trained and calibrated run as tier segments, with a manifest.

The policy is one of those ``offramp calibrate`` reported (``analysis/calibrate.json``): by
default the one cheapest on validation, or ``--policy NAME``. Its thresholds — and the
temperatures, learned confidence models or gates some families carry — are fitted again on
the validation split exactly as ``calibrate`` did, and checked against the thresholds the
report holds (a report written before the network changed is refused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offramp.calibration import calibrate_policies
from offramp.errors import ConfigError, DataError
from offramp.export import export_segments, load_bundle
from offramp.files import read_json

__all__ = ["export_run", "format_export"]


def _floats(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values]


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(
        x == y or (math.isfinite(x) and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12))
        for x, y in zip(a, b, strict=True)
    )


def export_run(
    run_dir: str | Path,
    *,
    fmt: str = "onnx",
    splits: Sequence[int] = (),
    policy: str | None = None,
    codec: str = "fp32",
    output: str | Path | None = None,
    example_rows: int = 16,
) -> dict[str, Any]:
    """Export the run in ``run_dir`` (see the module docstring); returns a summary.

    Args:
        run_dir: a directory written by ``offramp train`` and then ``offramp calibrate``.
        fmt: ``"onnx"`` or ``"torchscript"``.
        splits: the stage each later tier starts at (``[]``: one segment).
        policy: a policy family of the calibration report (default: the cheapest).
        codec: the activation codec the manifest names.
        output: the bundle's directory (default ``RUN_DIR/export/FMT``).
        example_rows: test inputs each segment is checked on against eager.
    """
    from offramp.jobs.evaluate import load_run
    from offramp.jobs.train import load_config, load_datasets

    run = Path(run_dir)
    report_path = run / "analysis" / "calibrate.json"
    if not report_path.is_file():
        raise ConfigError(
            f"{run} has no analysis/calibrate.json: calibrate first, e.g. "
            f"`offramp calibrate {run} --target-drop 0.5`"
        )
    report = read_json(report_path)
    try:
        rows = {str(r["policy"]): r for r in report["policies"]}
        goal = dict(report["goal"])
        cost = str(report.get("cost", "flops"))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{report_path} is malformed ({exc!r}); run `offramp calibrate` again"
        ) from exc
    if not rows:
        raise ConfigError(
            f"{report_path} holds no policy: no family reached the goal on validation"
        )
    name = policy or min(rows, key=lambda n: float(rows[n]["val_relative_cost"]))
    if name not in rows:
        raise ConfigError(f"no policy {name!r} in {report_path}; choose one of {sorted(rows)}")
    val, _, cum, _, gates = load_run(run, cost=cost)
    fitted = {
        c.name: c.policy
        for c in calibrate_policies(
            val,
            cum,
            delta=goal.get("delta"),
            budget=goal.get("budget"),
            confidence=goal.get("confidence"),
            feature_scorers=gates,
        )
    }
    chosen = fitted.get(name)
    want = rows[name]["description"]
    if chosen is None or (
        "thresholds" in want
        and not _same(_floats(getattr(chosen, "thresholds", ())), _floats(want["thresholds"]))
    ):
        raise ConfigError(
            f"policy {name!r} fitted again on validation differs from {report_path}: the run "
            "changed since it was calibrated; run `offramp calibrate` again"
        )
    from offramp.jobs.run_files import load_model

    net = load_model(run / "model.pt")
    x = load_datasets(load_config(run / "config.json")).test[0][:example_rows]
    out = Path(output) if output is not None else run / "export" / fmt
    manifest_path = export_segments(
        net,
        chosen,
        out,
        x,
        splits=splits,
        fmt=fmt,
        codec=codec,
        extra={
            "source": {
                "run_dir": str(run),
                "policy": name,
                "goal": goal,
                "test_accuracy": rows[name].get("test_accuracy"),
                "relative_cost": rows[name].get("relative_cost"),
            }
        },
    )
    bundle = load_bundle(out)  # what a tier will load: checksums checked, files loadable
    return {"manifest": str(manifest_path), **bundle.manifest}


def format_export(r: dict[str, Any]) -> str:
    """The export's summary: the policy, then one line per segment."""
    src = r["source"]
    lines = [
        f"exported {src['run_dir']} as {r['format']} with policy {src['policy']} "
        f"(test accuracy {src['test_accuracy']:.4f}, relative cost {src['relative_cost']:.3f}); "
        f"codec {r['codec']}",
    ]
    for s in r["segments"]:
        a, b = s["stages"]
        lines.append(
            f"  {s['file']}: stages {a}…{b - 1}{' (final exit)' if s['final'] else ''}, "
            f"{s['bytes']:,} bytes, max |export − eager| {s['max_difference']:.2g}"
        )
    lines.append(f"manifest: {r['manifest']}")
    return "\n".join(lines)
