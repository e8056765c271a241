import json

import pytest

from offramp.cli import main
from offramp.experiment import CONTRACT_KEYS


@pytest.mark.parametrize("mode", ["eager", "script"])
def test_demo_writes_json_and_plot(tmp_path, capsys, mode):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(
        ["demo", "--epochs", "3", "--quiet", "--mode", mode, "--json", str(js), "--plot", str(png)]
    )
    assert code == 0
    r = json.loads(js.read_text())
    for key in CONTRACT_KEYS:
        assert key in r
    for key in ("final_exit_accuracy", "early_exit_accuracy"):
        assert 0.0 <= r[key] <= 1.0
    assert sum(r["exit_fractions"]) == pytest.approx(1.0)
    assert len(r["exit_fractions"]) == 3
    assert r["relative_cost"] > 0 and r["speedup_batch1"] > 0 and r["speedup_batch256"] > 0
    assert r["runtime_matches_simulation"] == {"exits": 1.0, "predictions": 1.0}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "early-exit accuracy" in out and "share leaving" in out


def test_cli_reports_offramp_errors(capsys):
    assert main(["demo", "--delta", "-1", "--epochs", "1", "--quiet"]) == 2
    assert "delta" in capsys.readouterr().err
