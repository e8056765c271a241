import pytest
import torch
from torch import nn

from offramp import MultiExitNetwork, check_network
from offramp.errors import ConformanceError

from .families import FAMILIES


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_conforms(family):
    build, batch = FAMILIES[family]
    net = build()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = check_network(net, batch())
    assert report.passed, str(report)
    names = [r.name for r in report.rows]
    assert "runtime = simulation (eager)" in names and "runtime = simulation (script)" in names
    assert "every head receives a gradient" in names
    # the check changes nothing: weights, BatchNorm statistics, mode
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in net.parameters())


def _two_blocks(first: nn.Module, head0: nn.Module) -> MultiExitNetwork:
    return MultiExitNetwork(
        [first, nn.Sequential(nn.Linear(8, 8), nn.ReLU())],
        {0: head0, 1: nn.Linear(8, 3)},
        input_shape=(4,),
    )


class _BatchCentred(nn.Module):
    """Depends on which other samples share the batch: compaction changes its output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h):
        return self.fc(h - h.mean(dim=0, keepdim=True))


class _NumpyMatmul(nn.Module):
    """Work outside torch: no FLOPs counted."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return torch.from_numpy(x.detach().numpy() @ self.w.detach().numpy())


class _Frozen(nn.Module):
    """A head whose parameters never reach the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(8, 3)

    def forward(self, h):
        return h[:, :3] * 2.0


def test_a_batch_dependent_block_breaks_runtime_equals_simulation():
    torch.manual_seed(0)
    net = MultiExitNetwork(
        [nn.Linear(4, 8), _BatchCentred()],
        {0: nn.Linear(8, 3), 1: nn.Linear(8, 3)},
        input_shape=(4,),
    )
    with pytest.raises(ConformanceError, match=r"'runtime = simulation \(eager\)'") as err:
        check_network(net, torch.randn(32, 4), modes=("eager",))
    assert err.value.report.rows[-1].passed is False
    assert "exits give finite" in str(err.value)  # the report so far comes with it


def test_uncounted_work_breaks_the_flop_check():
    torch.manual_seed(0)
    net = _two_blocks(_NumpyMatmul(), nn.Linear(8, 3))
    with pytest.raises(ConformanceError, match=r"every block costs FLOPs.*blocks \[0\]"):
        check_network(net, torch.randn(8, 4), modes=())


def test_a_head_without_gradient_is_found():
    torch.manual_seed(0)
    net = _two_blocks(nn.Linear(4, 8), _Frozen())
    with pytest.raises(ConformanceError, match=r"heads of exit 0 receive none"):
        check_network(net, torch.randn(8, 4), modes=())


def test_unsupported_mode_is_reported_not_failed():
    from offramp.heads import SklearnHead

    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    head = SklearnHead("logistic", 4).fit(torch.randn(32, 8), torch.arange(32) % 4)
    net = MultiExitNetwork(
        [nn.Linear(4, 8), nn.Linear(8, 8)], {0: head, 1: nn.Linear(8, 4)}, input_shape=(4,)
    )
    report = check_network(net, x, modes=("script",))
    row = report.rows[-1]
    assert row.passed is None and "not supported" in row.detail and "eager" in row.detail


def test_too_small_a_batch_is_refused():
    with pytest.raises(ConformanceError, match="at least 4 samples"):
        check_network(FAMILIES["mlp"][0](), torch.randn(2, 6))


def test_every_module_gets_its_own_mode_back():
    net = FAMILIES["mlp"][0]().train()
    net.blocks[0].eval()
    check_network(net, torch.randn(8, 6), modes=("eager",))
    assert net.training and not net.blocks[0].training and net.blocks[1].training


def test_a_graph_network_conforms():
    from offramp.data.graphs import gcn_adjacency
    from offramp.models.gcn import gcn

    g = torch.Generator().manual_seed(0)
    upper = (torch.rand(40, 40, generator=g) < 0.08).triu(1)
    adj = gcn_adjacency((upper | upper.T).nonzero().T, 40)
    net = gcn(6, 3, hidden=(8, 8), seed=0)
    report = check_network(net, (torch.randn(40, 6, generator=g), adj))
    assert report.passed and len(report.rows) == 6, str(report)
