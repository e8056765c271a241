"""Reading a config file (``offramp.jobs.config.read_mapping``): every bad file is one
``ConfigError`` naming the file and the fix, never a traceback or a silently chosen value."""

from __future__ import annotations

import pytest

from offramp.cli import main
from offramp.errors import ConfigError
from offramp.jobs.config import load_config, read_mapping

yaml = pytest.importorskip("yaml")


@pytest.mark.parametrize("name", ["c.yaml", "c.json"])
def test_a_file_that_is_not_utf8_is_refused(tmp_path, name, capsys):
    path = tmp_path / name
    path.write_bytes("epochs: 2\nstrategy: joint # é\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        read_mapping(path)
    assert str(path) in str(err.value) and "UTF-8" in str(err.value)
    assert main(["train", str(path)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("offramp: error:") and "UTF-8" in err_text


@pytest.mark.parametrize("name", ["c.yaml", "run"])
def test_a_directory_is_not_called_missing(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    with pytest.raises(ConfigError) as err:
        read_mapping(path)
    assert "is a directory" in str(err.value) and "does not exist" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "text", "key"),
    [
        ("c.yaml", "epochs: 2\nlr: 0.01\nepochs: 5\n", "epochs"),
        ("c.yml", "strategy: distill\noptions:\n  alpha: 0.5\n  alpha: 0.9\n", "alpha"),
        ("c.json", '{"epochs": 2, "lr": 0.01, "epochs": 5}', "epochs"),
        ("c.json", '{"strategy": "distill", "options": {"alpha": 0.5, "alpha": 0.9}}', "alpha"),
    ],
)
def test_a_duplicate_key_is_refused_with_its_name_and_file(tmp_path, name, text, key):
    """YAML and JSON parsers keep the last of two equal keys without a word: the first value
    the user wrote would be ignored."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{key!r}" in msg and str(path) in msg and "twice" in msg


def test_equal_keys_in_different_mappings_are_fine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\noptions:\n  schedule: sdn\n  schedule_value: 0.5\n")
    assert read_mapping(path) == {
        "epochs": 2,
        "options": {"schedule": "sdn", "schedule_value": 0.5},
    }


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_output_dir_is_refused(value):
    """An empty output_dir would write the run's files into the current directory."""
    from offramp.jobs.config import TrainConfig

    with pytest.raises(ConfigError, match="output_dir is empty"):
        TrainConfig(output_dir=value)
    with pytest.raises(ConfigError, match="output_dir is empty"):
        TrainConfig.from_dict({"output_dir": value})
