"""offramp._values: one set of rules for values in configs and strategy options."""

import pytest

from offramp.errors import ConfigError
from offramp.jobs.config import TrainConfig
from offramp.training.registry import coerce_options


def _config_bool(value):
    return TrainConfig.from_dict({"resume": value}).resume


def _option_bool(value):
    return coerce_options("heads", {"train_backbone": value})["train_backbone"]


@pytest.mark.parametrize("parse", [_config_bool, _option_bool], ids=["config", "option"])
@pytest.mark.parametrize(
    ("value", "want"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("False", False),
        ("yes", None),
        ("on", None),
        ("1", None),
        (1, None),
        (0, None),
        (None, None),
    ],
)
def test_config_keys_and_strategy_options_read_booleans_alike(parse, value, want):
    if value is None and parse is _option_bool:
        assert parse(value) is None  # an option left unset keeps the strategy's default
        return
    if want is None:
        with pytest.raises(ConfigError, match="true or false"):
            parse(value)
    else:
        assert parse(value) is want


@pytest.mark.parametrize(("value", "want"), [("3", 3), (4.0, 4), ("5.0", 5), ("1e1", 10)], ids=str)
def test_config_keys_and_strategy_options_read_integers_alike(value, want):
    assert TrainConfig.from_dict({"epochs": value}).epochs == want
    assert coerce_options("layerwise", {"epochs_per_stage": value})["epochs_per_stage"] == want
