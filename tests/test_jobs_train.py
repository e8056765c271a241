"""``offramp train CONFIG``: config parsing, files written, resume, model reload, DDP launch."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from offramp.cli import main
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.jobs.train import (
    TrainConfig,
    build_network,
    load_config,
    load_datasets,
    load_model,
    run_training,
)
from offramp.training.loop import load_checkpoint

yaml = pytest.importorskip("yaml")

SMALL = {
    "dataset": "digits",
    "train_limit": 300,
    "val_fraction": 0.2,
    "backbone": "blenet",
    "epochs": 2,
    "lr": "3e-3",  # YAML reads this as a string; the config converts it
}


def _write_yaml(path, d):
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_from_dict_rejects_unknown_keys_with_suggestion():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"epoch": 3})
    msg = str(err.value)
    assert "'epoch'" in msg and "did you mean 'epochs'" in msg and "'batch_size'" in msg


@pytest.mark.parametrize(
    ("d", "words"),
    [
        ({"epochs": "many"}, ["epochs", "integer"]),
        ({"resume": "yes"}, ["resume", "true or false"]),
        ({"strategy": "jiont"}, ["did you mean 'joint'"]),
        ({"strategy": "joint", "options": {"temperature": 2}}, ["temperature", "schedule"]),
        ({"val_fraction": 1.5}, ["val_fraction", "[0, 1)"]),
        ({"exits": [0, "a"]}, ["exits[1]", "integer"]),
        ({"dataset": "digits", "data_dir": "/x"}, ["data_dir"]),
    ],
)
def test_from_dict_rejects_bad_values(d, words):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(d)
    for w in words:
        assert w in str(err.value)


def test_from_dict_converts_and_round_trips():
    cfg = TrainConfig.from_dict({"lr": "1e-3", "epochs": 4.0, "weight_decay": 0, "options": None})
    assert (cfg.lr, cfg.epochs, cfg.weight_decay, cfg.options) == (1e-3, 4, 0.0, {})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    fit = cfg.fit_config()
    assert (fit.lr, fit.epochs, fit.checkpoint) == (1e-3, 4, "runs/train/checkpoint.pt")


def test_yaml_and_json_give_the_same_config(tmp_path):
    d = {**SMALL, "strategy": "distill", "options": {"temperature": 2.0}, "exits": [1]}
    y = load_config(_write_yaml(tmp_path / "c.yaml", d))
    (tmp_path / "c.json").write_text(json.dumps(d))
    j = load_config(tmp_path / "c.json")
    assert y == j and y.lr == 3e-3 and y.exits == [1] and y.options == {"temperature": 2.0}


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.json"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "e.yml").write_text("")
    assert load_config(tmp_path / "e.yml") == TrainConfig()


def test_idx_dataset_without_location_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("OFFRAMP_DATA", raising=False)
    with pytest.raises(ConfigError, match="OFFRAMP_DATA"):
        load_datasets(TrainConfig(dataset="mnist"))


def test_mlp_takes_no_exits():
    with pytest.raises(ConfigError, match="remove `exits`"):
        build_network(TrainConfig(backbone="mlp", exits=[0]), 8, 10)
    assert build_network(TrainConfig(backbone="mlp"), 8, 10).num_exits == 3


def test_validation_split_is_stratified_and_seeded():
    a = load_datasets(TrainConfig(train_limit=500, val_fraction=0.2, seed=1))
    b = load_datasets(TrainConfig(train_limit=500, val_fraction=0.2, seed=1))
    assert torch.equal(a.val[1], b.val[1]) and len(a.val[1]) == 100 and len(a.train[1]) == 400
    counts = a.val[1].bincount(minlength=10).float() / 100
    full = torch.cat([a.train[1], a.val[1]]).bincount(minlength=10).float() / 500
    assert (counts - full).abs().max() < 0.02


@pytest.mark.parametrize("strategy", ["joint", "distill"])
def test_train_writes_results_and_resumes(tmp_path, capsys, strategy):
    out = tmp_path / "run"
    cfg = _write_yaml(tmp_path / "c.yaml", {**SMALL, "strategy": strategy})
    assert main(["train", cfg, "--quiet", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and str(out) in printed

    for name in ("config.yaml", "config.json", "history.csv", "history.json", "metrics.json"):
        assert (out / name).is_file(), name
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["exits"] == [0, 1] and resolved["head"] == "conv"
    assert resolved["strategy"] == strategy and resolved["output_dir"] == str(out)
    assert load_config(out / "config.yaml") == TrainConfig.from_dict(resolved)

    with open(out / "history.csv") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    exit_cols = [f"exit{i}_{k}" for i in range(3) for k in ("loss", "train_acc", "val_acc")]
    assert header[:13] == ["epoch", "phase", "loss", "seconds", *exit_cols]
    assert len(body) == 2 and all(len(r) == len(header) for r in body)
    assert [r[0] for r in body] == ["0", "1"]
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 2 and list(hist[0]) == header
    assert all(v is None or not (isinstance(v, float) and math.isnan(v)) for v in hist[0].values())

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("strategy", "exit_accuracies", "final_accuracy", "train_seconds", "num_exits"):
        assert key in metrics
    assert metrics["strategy"] == strategy and metrics["num_exits"] == 3
    assert len(metrics["exit_accuracies"]) == 3
    assert metrics["final_accuracy"] == metrics["exit_accuracies"][-1]
    assert metrics["train_seconds"] == pytest.approx(sum(h["seconds"] for h in hist))

    # model.pt rebuilds the trained network: same weights as the checkpoint, same accuracies
    net = load_model(out / "model.pt")
    fresh = build_network(TrainConfig.from_dict(resolved), 8, 10)
    fresh.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])
    x = load_datasets(TrainConfig.from_dict(resolved)).test[0]
    fresh.eval()
    for a, b in zip(net(x), fresh(x), strict=True):
        assert torch.equal(a, b)
    test = load_datasets(TrainConfig.from_dict(resolved)).test
    acc = ExitRecord.collect(net, test).exit_accuracy().tolist()
    assert acc == metrics["exit_accuracies"]

    # the same command again resumes: nothing trained, the same history and results
    before = {n: (out / n).read_text() for n in ("history.csv", "history.json")}
    mtime = (out / "checkpoint.pt").stat().st_mtime_ns
    assert main(["train", cfg, "--quiet", "--output-dir", str(out)]) == 0
    assert (out / "checkpoint.pt").stat().st_mtime_ns == mtime  # no epoch wrote it
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    after = {n: (out / n).read_text() for n in before}
    assert after == before
    again = json.loads((out / "metrics.json").read_text())
    assert (again["epochs_this_run"], metrics["epochs_this_run"]) == (0, 2)
    this_run = ("epochs_this_run", "seconds_this_run")
    assert {k: v for k, v in again.items() if k not in this_run} == {
        k: v for k, v in metrics.items() if k not in this_run
    }


def test_rerunning_a_finished_run_says_nothing_was_trained(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _write_yaml(tmp_path / "c.yaml", {**SMALL, "epochs": 1, "train_limit": 100})
    assert main(["train", cfg, "--quiet", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trained 1 epoch in" in printed and "already trained" not in printed
    assert json.loads((out / "metrics.json").read_text())["epochs_this_run"] == 1
    assert main(["train", cfg, "--quiet", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"already trained: 1 epoch in {out}/, nothing to do (results rewritten)" in printed
    assert "trained in" not in printed and "trained 1 epoch in" not in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_this_run"] == 0 and metrics["epochs"] == 1


def test_resume_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _write_yaml(tmp_path / "c.yaml", {**SMALL, "epochs": 1})
    assert main(["train", cfg, "--quiet", "--output-dir", str(out)]) == 0
    other = _write_yaml(tmp_path / "d.yaml", {**SMALL, "epochs": 1, "lr": 0.01})
    assert main(["train", other, "--quiet", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.003 -> 0.01" in err and "output_dir" in err


def test_more_epochs_continue_a_finished_run(tmp_path, capsys):
    """`--epochs 2` on a finished 1-epoch run trains epoch 2 (constant learning rate and λ:
    the result is the 2-epoch run's); fewer epochs than trained are refused."""
    out = tmp_path / "run"
    cfg = _write_yaml(tmp_path / "c.yaml", {**SMALL, "epochs": 1, "train_limit": 100})
    assert main(["train", cfg, "--quiet", "--output-dir", str(out)]) == 0
    assert main(["train", cfg, "--quiet", "--output-dir", str(out), "--epochs", "2"]) == 0
    assert "trained 1 more epoch" in capsys.readouterr().out
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0, 1]
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["epochs"], metrics["epochs_this_run"]) == (2, 1)
    straight = tmp_path / "straight"
    assert main(["train", cfg, "--quiet", "--output-dir", str(straight), "--epochs", "2"]) == 0
    a = load_checkpoint(out / "checkpoint.pt")["model"]
    b = load_checkpoint(straight / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    capsys.readouterr()
    assert main(["train", cfg, "--quiet", "--output-dir", str(out)]) == 2  # epochs: 1 again
    err = capsys.readouterr().err
    assert "holds 2 epochs trained" in err and "epochs ≥ 2" in err
    assert json.loads((out / "config.json").read_text())["epochs"] == 2  # nothing rewritten


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"lr_schedule": "cosine"}, ["lr_schedule cosine anneals", "new output_dir"]),
        ({"strategy": "freezeout"}, ["freezeout freezes each block"]),
        ({"options": {"schedule": "sdn"}}, ["λ schedule sdn"]),
        ({"strategy": "layerwise"}, ["strategy 'layerwise'", "stage"]),
    ],
)
def test_more_epochs_are_refused_when_training_depends_on_the_total(
    tmp_path, capsys, settings, words
):
    out = tmp_path / "run"
    cfg = _write_yaml(tmp_path / "c.yaml", {**SMALL, "epochs": 1, "train_limit": 100, **settings})
    assert main(["train", cfg, "--quiet", "--output-dir", str(out)]) == 0
    before = (out / "config.json").read_text()
    capsys.readouterr()
    assert main(["train", cfg, "--quiet", "--output-dir", str(out), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offramp: error:") and len(err.strip().splitlines()) == 1
    assert "epochs: 1" in err  # what would resume it
    for w in words:
        assert w in err
    assert (out / "config.json").read_text() == before


@pytest.mark.parametrize(
    ("strategy", "options", "words"),
    [
        ("freezeout", {"t0": 2}, ["t0", "(0, 1]"]),
        ("distill", {"alpha": 1.5}, ["alpha", "[0, 1]"]),
        ("combined", {"mode": "blend"}, ["combine mode", "'blend'"]),
        ("cost", {"beta": -1}, ["beta", "≥ 0"]),
        ("layerwise", {"cache": "fast"}, ["cache", "'fast'"]),
        ("heads", {"cache": "recompute"}, ["cache", "'recompute'"]),
        ("heads", {"sklearn": "boosting"}, ["scikit-learn head", "'boosting'"]),
        ("ib", {"epochs_per_stage": 0}, ["epochs_per_stage", "≥ 1"]),
        ("layerwise", {"memory_budget_mb": -5}, ["memory_budget_mb", "> 0"]),
    ],
)
def test_a_bad_strategy_option_is_refused_before_anything_is_written(
    tmp_path, capsys, strategy, options, words
):
    """The strategy is built (or its options checked) before output_dir is touched, and the
    message names the config file the option is in."""
    out = tmp_path / "run"
    cfg = _write_yaml(
        tmp_path / "c.yaml", {**SMALL, "strategy": strategy, "options": options, "epochs": 1}
    )
    assert main(["train", cfg, "--quiet", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"offramp: error: {cfg}: ") and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err
    assert not out.exists()


def test_interrupted_run_resumes_with_whole_history(tmp_path):
    """A run stopped after epoch 1 of 2 and re-run ends with both epochs in its history."""
    out = tmp_path / "run"
    first = TrainConfig.from_dict({**SMALL, "epochs": 2, "output_dir": str(out)})
    # Simulate the interruption: train 1 epoch with the 2-epoch settings' checkpoint …
    run_training(TrainConfig.from_dict({**first.to_dict(), "show_progress": False}))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    ckpt["epoch"], ckpt["history"] = 1, ckpt["history"][:1]
    torch.save(ckpt, out / "checkpoint.pt")
    # … then resume: epoch 1 is retrained, epoch 0 comes from the checkpoint.
    m = run_training(TrainConfig.from_dict({**first.to_dict(), "show_progress": False}))
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1] and m["epochs"] == 2


def test_ddp_run_with_two_ranks(tmp_path, capfd):
    out = tmp_path / "ddp"
    cfg = _write_yaml(tmp_path / "c.yaml", {**SMALL, "strategy": "joint"})
    assert main(["train", cfg, "--nproc", "2", "--quiet", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_exits"] == 3 and len(metrics["exit_accuracies"]) == 3
    assert len(json.loads((out / "history.json").read_text())) == 2
    assert (out / "model.pt").is_file()
    assert capfd.readouterr().out.count("test accuracy") == 1  # rank 0 reports, once


def test_idx_dataset_from_data_dir(tmp_path):
    from .conftest import data_dir

    cfg = TrainConfig(
        dataset="mnist",
        data_dir=str(data_dir("mnist")),
        train_limit=500,
        backbone="mlp",
        epochs=1,
        output_dir=str(tmp_path / "run"),
        show_progress=False,
    )
    m = run_training(cfg)
    assert m["test_samples"] == 10_000 and m["num_exits"] == 3
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["head"] == "linear" and resolved["exits"] is None


def test_sklearn_heads_survive_model_pt_without_pickle(tmp_path):
    from offramp.heads import SklearnHead

    cfg = _write_yaml(
        tmp_path / "c.yaml",
        {
            **SMALL,
            "strategy": "heads",
            "options": {"sklearn": "tree"},
            "epochs": 1,
            "output_dir": str(tmp_path / "out"),
        },
    )
    assert main(["train", cfg, "--quiet"]) == 0
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)  # no pickle inside
    assert state["state_dict"]["heads.0._extra_state"]["skops"].dtype == torch.uint8
    net = load_model(tmp_path / "out" / "model.pt")
    assert isinstance(net.heads[0], SklearnHead) and net.heads[0].fitted
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    data = load_datasets(load_config(tmp_path / "out" / "config.json"))
    acc = ExitRecord.collect(net, data.test).exit_accuracy().tolist()
    assert acc == pytest.approx(metrics["exit_accuracies"])


@pytest.mark.parametrize("missing", [["rng"], ["history"], ["epoch", "optimizer"]])
def test_a_checkpoint_missing_keys_is_one_line_naming_them(tmp_path, capsys, missing):
    out = tmp_path / "run"
    cfg = _write_yaml(tmp_path / "c.yaml", {**SMALL, "epochs": 1, "train_limit": 100})
    assert main(["train", cfg, "--quiet", "--output-dir", str(out)]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    for k in missing:
        del state[k]
    torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", cfg, "--quiet", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offramp: error:") and len(err.strip().splitlines()) == 1
    assert str(missing) in err and "delete it" in err and "resume: false" in err


class _Payload:
    """Unpickling this creates ``marker``: stands in for any code a crafted file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["checkpoint.pt", "backbone/checkpoint.pt", "model.pt"])
def test_crafted_files_in_a_run_never_execute_code(tmp_path, where, capsys):
    """Resuming (`train`, `place`) or analysing (`evaluate`) reads .pt files with
    weights_only=True: a pickle payload is refused with one line, never run."""
    from offramp.errors import CheckpointError, DataError

    out = tmp_path / "out"
    marker = tmp_path / "pwned"
    target = out / where
    target.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "payload": _Payload(marker)}, target)
    if where == "checkpoint.pt":
        cfg = _write_yaml(tmp_path / "c.yaml", {**SMALL, "output_dir": str(out)})
        code = main(["train", cfg, "--quiet"])
    elif where == "model.pt":
        (out / "config.json").write_text(json.dumps({**SMALL, "lr": 3e-3}))
        code = main(["evaluate", str(out)])
    else:
        cfg = _write_yaml(
            tmp_path / "p.yaml", {"train": SMALL, "head_epochs": 1, "output_dir": str(out)}
        )
        code = main(["place", cfg, "--quiet"])
    assert code == 2 and not marker.exists()
    err = capsys.readouterr().err
    assert err.startswith("offramp: error:") and str(target) in err
    with pytest.raises((CheckpointError, DataError)):
        (load_checkpoint if where != "model.pt" else load_model)(target)
    assert not marker.exists()
