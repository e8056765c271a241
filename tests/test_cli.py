import json

import pytest
import torch

from offramp.cli import main
from offramp.jobs.experiment import CONTRACT_KEYS


# The defaults (script mode, 16x16, self-distillation) run in test_readme.py; this run takes
# every other flag: eager mode, B-LeNet's input size, joint training, BranchyNet's head.
def test_demo_writes_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["demo", "--epochs", "3", "--quiet", "--mode", "eager", "--json", str(js), "--plot"]
    flags = ["--size", "8", "--distill", "0", "--head", "conv", "--threads", "1"]
    threads = torch.get_num_threads()
    code = main([*argv, str(png), *flags])
    assert code == 0 and torch.get_num_threads() == threads  # --threads is undone afterwards
    r = json.loads(js.read_text())
    assert r["threads"] == 1 and r["mode"] == "eager"
    assert r["config"]["size"] == 8 and r["config"]["distill"] == 0
    for key in CONTRACT_KEYS:
        assert key in r
    for key in ("final_exit_accuracy", "early_exit_accuracy"):
        assert 0.0 <= r[key] <= 1.0
    assert sum(r["exit_fractions"]) == pytest.approx(1.0)
    assert len(r["exit_fractions"]) == 2
    assert r["relative_cost"] > 0 and r["speedup_batch1"] > 0 and r["speedup_batch256"] > 0
    assert r["runtime_matches_simulation"] == {"exits": 1.0, "predictions": 1.0}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "early-exit accuracy" in out and "share leaving" in out and "mode" in out


def test_cli_reports_offramp_errors(capsys):
    assert main(["demo", "--delta", "-1", "--epochs", "1", "--quiet"]) == 2
    assert "delta" in capsys.readouterr().err
    assert main(["demo", "--threads", "-1", "--quiet"]) == 2
    assert "threads" in capsys.readouterr().err


def test_place_prints_every_rule_and_writes_json_and_plot(tmp_path, capsys):
    cfg = {
        "train": {
            "dataset": "digits",
            "backbone": "resnet",
            "val_fraction": 0.2,
            "epochs": 4,
            "lr": 3e-3,
            "show_progress": False,
        },
        "head_epochs": 2,
        "target_drop": 1.0,
        "output_dir": str(tmp_path / "place"),
    }
    path = tmp_path / "place.json"
    path.write_text(json.dumps(cfg))
    assert main(["place", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    for rule in ("all", "flops_spacing", "eq4", "eq5_greedy", "exhaustive", "cost profile"):
        assert rule in out
    result = json.loads((tmp_path / "place" / "placement.json").read_text())
    assert [r["rule"] for r in result["rows"]] == [
        "all", "flops_spacing", "eq4", "eq5_greedy", "exhaustive"
    ]  # fmt: skip
    for row in result["rows"]:
        assert {"exits", "expected_cost", "accuracy"} <= set(row)
    assert (tmp_path / "place" / "placement.png").stat().st_size > 0
    heads = tmp_path / "place" / "candidates.pt"
    stamp = heads.stat().st_mtime_ns
    assert main(["place", str(path)]) == 0  # resumes (progress bars on): nothing retrained
    assert heads.stat().st_mtime_ns == stamp
    path.write_text(json.dumps({**cfg, "cost": "latency"}))  # same heads, cost in seconds
    assert main(["place", str(path), "--quiet"]) == 0
    result = json.loads((tmp_path / "place" / "placement.json").read_text())
    assert result["cost"] == "latency" and len(result["rows"]) == 5
    assert all(r["block_ms_per_sample"] > 0 for r in result["profile"])
    assert "cost in latency" in capsys.readouterr().out


def test_place_rejects_a_bad_config(tmp_path, capsys):
    path = tmp_path / "place.json"
    path.write_text(json.dumps({"rules": ["all", "best"]}))
    assert main(["place", str(path)]) == 2
    assert "rules must be a list from" in capsys.readouterr().err
    path.write_text(json.dumps({"train": {"epoch": 3}}))
    assert main(["place", str(path)]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "place"])
def test_an_empty_output_dir_is_refused(tmp_path, monkeypatch, capsys, command):
    """`--output-dir ''` (or `output_dir: ''`) would write into the current directory."""
    monkeypatch.chdir(tmp_path)
    train = {"train_limit": 100, "epochs": 1, "val_fraction": 0.2, "show_progress": False}
    cfg = train if command == "train" else {"train": train, "head_epochs": 1}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert main([command, str(path), "--quiet", "--output-dir", ""]) == 2
    assert "output_dir is empty" in capsys.readouterr().err
    path.write_text(json.dumps({**cfg, "output_dir": ""}))
    assert main([command, str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "output_dir is empty" in err and str(path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]
