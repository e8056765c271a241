"""``offramp evaluate`` and ``offramp calibrate`` on a run written by ``offramp train``."""

import json

import numpy as np
import pytest
import torch

from offramp.analysis import oracle_saving_captured, overthinking
from offramp.calibration import calibrate_policies
from offramp.cli import main
from offramp.evaluation import ExitRecord
from offramp.jobs.evaluate import format_calibration, format_evaluation, load_run
from offramp.jobs.train import load_config, load_datasets, load_gates, load_model
from offramp.policies import decide_from_logits
from offramp.runtime import EarlyExitRuntime

yaml = pytest.importorskip("yaml")


def _train(out, **settings):
    """A short digits run written by ``offramp train`` into ``out/run``."""
    cfg = out / "c.yaml"
    base = {"dataset": "digits", "epochs": 3, "lr": 3e-3, "val_fraction": 0.3}
    cfg.write_text(yaml.safe_dump({**base, **settings, "output_dir": str(out / "run")}))
    assert main(["train", str(cfg), "--quiet"]) == 0
    return out / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("run"))


def test_evaluate_writes_tables_json_and_plot(run_dir, capsys):
    assert main(["evaluate", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "ECE after T" in text and "oracle" in text
    r = json.loads((run_dir / "analysis" / "evaluate.json").read_text())
    e = len(r["exit_accuracy"])
    assert len(r["overthinking"]["pairs"]) == e and len(r["calibration"]["exits"]) == e
    assert r["oracle"]["accuracy"] >= max(r["exit_accuracy"]) - 1e-12
    assert (run_dir / "analysis" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "goal",
    [["--target-drop", "0.5"], ["--budget", "0.5"], ["--target-drop", "1", "--confidence", "0.9"]],
)
def test_calibrate_reports_every_family(run_dir, goal, capsys):
    assert main(["calibrate", str(run_dir), *goal]) == 0
    assert "goal held" in capsys.readouterr().out
    r = json.loads((run_dir / "analysis" / "calibrate.json").read_text())
    names = {p["policy"] for p in r["policies"]}
    assert {"entropy", "max_prob", "margin", "entropy+T", "learned"} <= names
    for p in r["policies"]:
        assert 0 <= p["relative_cost"] <= 1 and 0 <= p["test_accuracy"] <= 1
        if goal[0] == "--budget":
            assert p["val_relative_cost"] <= 0.5 + 1e-9
        if "--confidence" in goal and p["policy"] in ("entropy", "max_prob", "learned"):
            assert p["val_bound"] >= -0.01 - 1e-9


def test_calibrate_needs_exactly_one_goal(run_dir, capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", str(run_dir)])
    assert main(["calibrate", str(run_dir / "nope"), "--budget", "0.5"]) == 2
    assert "offramp train" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("goal", "words"),
    [
        (["--target-drop", "1", "--confidence", "2"], ["--confidence", "[0.5, 1)", "2.0"]),
        (["--target-drop", "1", "--confidence", "0"], ["--confidence", "[0.5, 1)"]),
        (["--target-drop", "1", "--confidence", "nan"], ["--confidence", "nan"]),
        (["--target-drop", "nan"], ["--target-drop", "[0, 100)", "nan"]),
        (["--target-drop", "-1"], ["--target-drop", "[0, 100)"]),
        (["--target-drop", "100"], ["--target-drop", "percentage points"]),
        (["--budget", "-1"], ["--budget", "(0, 1]", "-1.0"]),
        (["--budget", "nan"], ["--budget", "(0, 1]", "nan"]),
        (["--budget", "0"], ["--budget", "(0, 1]"]),
        (["--budget", "1.5"], ["--budget", "fraction"]),
    ],
)
def test_calibrate_refuses_a_bad_goal_before_any_work(tmp_path, capsys, goal, words):
    """A goal calibration cannot meet is refused up front, in the flag's own units, before the
    run is even looked at (here there is none: the goal's error comes first)."""
    assert main(["calibrate", str(tmp_path / "no-run"), *goal]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offramp: error:") and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err
    assert "model.pt" not in err


def _calibration_result(goal):
    row = {"val_accuracy": 0.9, "test_accuracy": 0.9, "relative_cost": 0.4}
    return {
        "goal": goal,
        "cost": "flops",
        "final_exit_accuracy": 0.9,
        "oracle": {"accuracy": 0.97, "relative_cost": 0.5},
        "policies": [
            {**row, "policy": "entropy", "accuracy_drop_pp": -0.12,
             "oracle_saving_captured": 1.025, "goal_held_on_test": True},
            {**row, "policy": "margin", "accuracy_drop_pp": 0.3,
             "oracle_saving_captured": 0.8, "goal_held_on_test": False},
            {**row, "policy": "patience", "accuracy_drop_pp": 0.0,
             "oracle_saving_captured": 0.5, "goal_held_on_test": True},
        ],
        "json": "run/analysis/calibrate.json",
    }  # fmt: skip


def test_calibration_text_speaks_the_users_units():
    """The goal as the flag gave it; a gain never reads as a negative drop; the share of the
    oracle's saving is named and explained, with a pointer to the docs."""
    text = format_calibration(_calibration_result({"delta": 0.005}))
    assert "accuracy drop ≤ 0.5 pp" in text and "delta" not in text
    assert "+0.12 gain" in text and "-0.30 drop" in text and "drop pp" not in text
    assert "oracle captured" not in text and "of oracle saving" in text
    legend = text[text.index("change pp:") :]
    assert "> 1" in legend and "lower accuracy" in legend and "docs/policies.md" in legend
    text = format_calibration(_calibration_result({"budget": 0.5}))
    assert "expected cost ≤ 0.5 of the full network" in text and "budget" not in text


def test_evaluation_text_explains_its_columns():
    r = {
        "exit_accuracy": [0.8, 0.9],
        "cumulative": [1.0, 2.0],
        "overthinking": {"to_final": [0.03, 0.0], "final_accuracy": 0.9},
        "calibration": {
            "exits": [
                {"exit": i, "temperature": 1.5, "ece_before": 0.1, "ece_after": 0.05}
                for i in range(2)
            ]
        },
        "oracle": {"accuracy": 0.95, "relative_cost": 0.6},
        "pareto": {"front": [1], "points": [1, 2]},
        "json": "run/analysis/evaluate.json",
    }
    text = format_evaluation(r)
    table, legend = text.split("\n\n", 1)
    assert "overthink→final" in table and "ECE after T" in table
    for words in (
        "overthink→final: share of test samples this exit gets right and the final exit wrong",
        "T: temperature",
        "ECE after T",
        "docs/policies.md",
    ):
        assert words in legend, words


def test_overthinking_and_oracle_capture_by_hand():
    # exits right/wrong per sample: exit0 [1,0,1], exit1 [0,1,1]
    logits = np.zeros((2, 3, 2), dtype=np.float32)
    labels = np.array([0, 0, 1])
    logits[0, :, 0] = [1, 0, 0]
    logits[0, :, 1] = [0, 1, 1]
    logits[1, :, 0] = [0, 1, 0]
    logits[1, :, 1] = [1, 0, 1]
    rec = ExitRecord(torch.from_numpy(logits), torch.from_numpy(labels))
    o = overthinking(rec)
    assert o["pairs"][0][1] == pytest.approx(1 / 3)  # sample 0: right at 0, wrong at 1
    assert o["earliest_right_accuracy"] == 1.0 and o["final_accuracy"] == pytest.approx(2 / 3)
    assert oracle_saving_captured(1.0, 0.5) == 0.0
    assert oracle_saving_captured(0.5, 0.5) == 1.0


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("gated"), strategy="cost", options={"beta": 0.2})


def test_gated_run_saves_its_gates_and_calibrate_uses_them(gated_run, run_dir, capsys):
    assert load_gates(run_dir / "model.pt") is None  # joint training has no gates
    gates = load_gates(gated_run / "model.pt")
    net = load_model(gated_run / "model.pt")
    assert gates is not None and len(gates) == net.num_exits - 1
    run = load_run(gated_run)
    assert run.gates is not None and run.info["gates"] is True
    assert run.val.feature_scores is not None and run.test.feature_scores is not None
    # the saved gates are the trained ones: they are not all at their initial g = ½
    assert not torch.allclose(
        run.test.feature_scores, torch.full_like(run.test.feature_scores, 0.5)
    )

    assert main(["calibrate", str(gated_run), "--target-drop", "1"]) == 0
    assert "gates" in capsys.readouterr().out
    r = json.loads((gated_run / "analysis" / "calibrate.json").read_text())
    row = next(p for p in r["policies"] if p["policy"] == "gates")
    final_val = float(run.val.correct()[-1].double().mean())
    assert row["val_accuracy"] >= final_val - 0.01 - 1e-9  # its goal, on its own split
    # the calibrated gate policy decides the same in the runtime as in the simulation
    pol = next(
        c.policy
        for c in calibrate_policies(run.val, run.cumulative, delta=0.01, feature_scorers=run.gates)
        if c.name == "gates"
    )
    x = load_datasets(load_config(gated_run / "config.json")).test[0]
    rt = EarlyExitRuntime(net, pol)
    np.testing.assert_array_equal(
        rt(x).exits.numpy(),
        decide_from_logits(pol, run.test.logits, run.test.feature_scores).numpy(),
    )

    assert main(["evaluate", str(gated_run)]) == 0
    ev = json.loads((gated_run / "analysis" / "evaluate.json").read_text())
    assert ev["gates"] is True


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("drop state_dict", ["lacks ['state_dict']", "retrain"]),
        ("drop a tensor", ["does not fit the network its config describes", "Missing key"]),
        ("reshape a tensor", ["does not fit the network its config describes", "size mismatch"]),
    ],
)
def test_a_damaged_model_pt_is_one_line(run_dir, tmp_path, capsys, damage, words):
    """`offramp evaluate` on a model.pt that lacks keys or holds wrong-shaped tensors: one
    DataError line naming the file and the fix, no traceback."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("analysis"))
    state = torch.load(run / "model.pt", weights_only=True)
    sd = state["state_dict"]
    name = next(iter(sd))
    if damage == "drop state_dict":
        del state["state_dict"]
    elif damage == "drop a tensor":
        del sd[name]
    else:
        sd[name] = torch.zeros(*sd[name].shape, 2)
    torch.save(state, run / "model.pt")
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offramp: error:") and len(err.strip().splitlines()) == 1
    assert str(run / "model.pt") in err
    for w in words:
        assert w in err


def test_a_write_that_fails_keeps_the_previous_results(run_dir, tmp_path):
    """A file-size limit (what a full disk does to a write) stops `offramp calibrate` with one
    line; the previous calibrate.json stays intact and valid, no temporary is left behind."""
    import resource
    import signal
    import subprocess
    import sys

    assert main(["calibrate", str(run_dir), "--target-drop", "0.5"]) == 0
    before = (run_dir / "analysis" / "calibrate.json").read_bytes()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))

    proc = subprocess.run(
        [sys.executable, "-m", "offramp.cli", "calibrate", str(run_dir), "--target-drop", "1"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not write" in lines[0] and "calibrate.json" in lines[0]
    assert (run_dir / "analysis" / "calibrate.json").read_bytes() == before
    assert not [p.name for p in (run_dir / "analysis").iterdir() if p.name.endswith(".tmp")]


def test_export_writes_a_bundle_that_decides_as_the_runtime(run_dir, tmp_path, capsys):
    from offramp.export import load_bundle
    from offramp.jobs.export import export_run

    assert main(["calibrate", str(run_dir), "--target-drop", "1", "--confidence", "0.9"]) == 0
    out = tmp_path / "bundle"
    args = ["--format", "torchscript", "--split", "1", "--policy", "learned"]
    assert main(["export", str(run_dir), *args, "--output", str(out), "--codec", "int8"]) == 0
    text = capsys.readouterr().out
    assert "policy learned" in text and "segment-1.pt: stages 1…" in text
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m["codec"] == "int8" and m["source"]["goal"]["confidence"] == 0.9
    assert m["splits"] == [1] and m["policy"]["criterion"] == "learned"
    x = load_datasets(load_config(run_dir / "config.json")).test[0]
    run = load_run(run_dir)
    policy = next(
        c.policy
        for c in calibrate_policies(run.val, run.cumulative, delta=0.01, confidence=0.9)
        if c.name == "learned"
    )
    assert torch.equal(
        bundle.run(x)[1], EarlyExitRuntime(load_model(run_dir / "model.pt"), policy)(x).exits
    )
    # the default policy is the cheapest on validation; the default output is in the run
    r = export_run(run_dir, fmt="torchscript")
    report = json.loads((run_dir / "analysis" / "calibrate.json").read_text())
    cheapest = min(report["policies"], key=lambda p: p["val_relative_cost"])["policy"]
    assert r["source"]["policy"] == cheapest
    assert r["manifest"] == str(run_dir / "export" / "torchscript" / "manifest.json")


def test_export_refusals_are_one_line(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--policy", "nope", "--format", "torchscript"]) == 2
    assert "no policy 'nope'" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--split", "a,b"]) == 2
    assert "--split takes stage numbers" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--split", "7", "--format", "torchscript"]) == 2
    assert "outside 1 …" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert main(["export", str(fresh)]) == 2
    assert "calibrate first" in capsys.readouterr().err
    # a report from before the network changed is refused
    report = run_dir / "analysis" / "calibrate.json"
    saved = report.read_text()
    r = json.loads(saved)
    for p in r["policies"]:
        if "thresholds" in p["description"]:
            p["description"]["thresholds"] = [0.123] * len(p["description"]["thresholds"])
    report.write_text(json.dumps(r))
    try:
        assert main(["export", str(run_dir), "--policy", "entropy", "--format", "torchscript"]) == 2
        assert "differs from" in capsys.readouterr().err
    finally:
        report.write_text(saved)
