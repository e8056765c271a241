"""offramp.report: pictures a person reads at a glance."""

from offramp.report import plot_policies, policy_groups


def test_policies_on_the_same_spot_share_one_legend_entry(tmp_path, monkeypatch):
    rows = [
        {"policy": name, "relative_cost": cost, "test_accuracy": acc}
        for name, cost, acc in [("entropy", 0.08, 0.944), ("max_prob", 0.08, 0.944),
                                ("learned", 0.08, 0.944), ("patience", 0.4, 0.936)]
    ]  # fmt: skip
    assert policy_groups(rows) == [
        (0.08, 0.944, ["entropy", "max_prob", "learned"]),
        (0.4, 0.936, ["patience"]),
    ]
    import matplotlib.axes

    labels: list[str] = []
    real = matplotlib.axes.Axes.scatter

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label", ""))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", spy)
    result = {"policies": rows, "oracle": {"relative_cost": 0.09, "accuracy": 0.96},
              "final_exit_accuracy": 0.925}  # fmt: skip
    path = plot_policies(result, tmp_path / "calibrate.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert labels == ["entropy, max_prob, learned", "patience", "oracle"]  # no text on points
