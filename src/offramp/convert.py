"""Turn an existing ``nn.Module`` into a :class:`MultiExitNetwork`.

``nn.Sequential`` models are sliced at top-level children; any other model is traced with
``torch.fx`` and its graph is cut after the named modules. A cut is only valid where exactly one
tensor crosses it (that tensor is ``h_i``): cutting inside a residual block, for instance, would
need two, and is refused with the names of the values that would cross.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx
from torch import Tensor, nn

from offramp.errors import ConversionError, ShapeError
from offramp.heads import HeadFactory, make_head
from offramp.network import MultiExitNetwork, block_output_shapes

__all__ = ["attach_exits", "split_model"]


def _seq_positions(model: nn.Sequential, at: Sequence[str | int]) -> list[int]:
    names = [n for n, _ in model.named_children()]
    pos: list[int] = []
    for a in at:
        if isinstance(a, int) and not isinstance(a, bool):
            if not -len(names) <= a < len(names):
                raise ConversionError(
                    f"layer index {a} is out of range for a Sequential of {len(names)} children"
                )
            pos.append(a % len(names))
        elif str(a) in names:
            pos.append(names.index(str(a)))
        else:
            raise ConversionError(
                f"unknown layer name {a!r}; valid names for this nn.Sequential are {names}"
            )
    return pos


def _check_cuts(pos: list[int], n: int, names: Sequence[object]) -> list[int]:
    if len(set(pos)) != len(pos):
        raise ConversionError(f"exit positions {list(names)} name the same layer twice")
    if pos and max(pos) >= n - 1:
        raise ConversionError(
            "cannot place an exit after the model's last layer: the final exit is always there; "
            f"remove {names[pos.index(max(pos))]!r} from `at`"
        )
    return sorted(pos)


def _split_sequential(model: nn.Sequential, at: Sequence[str | int]) -> list[nn.Module]:
    pos = _check_cuts(_seq_positions(model, at), len(model), list(at))
    bounds = [-1, *pos, len(model) - 1]
    return [model[bounds[k] + 1 : bounds[k + 1] + 1] for k in range(len(bounds) - 1)]


def _module_positions(nodes: list[torch.fx.Node]) -> dict[str, int]:
    """Map every module called in ``forward`` (and every prefix of its name) to the index of the
    last graph node computed inside it: a module's own functional ops count (a block whose
    ``forward`` ends in ``F.relu(self.bn(...))`` ends after the ReLU, not after ``bn``). Scopes
    come from the tracer's module stack (``node.meta["nn_module_stack"]``)."""
    out: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        scopes: list[str] = []
        if node.op == "call_module":
            scopes.append(str(node.target))
        for key, value in node.meta.get("nn_module_stack", {}).items():
            qualname = value[0] if isinstance(value, tuple) and value else key
            scopes.append(str(qualname))
        for scope in scopes:
            parts = scope.split(".")
            for k in range(1, len(parts) + 1):
                out[".".join(parts[:k])] = idx
    return out


def _split_fx(model: nn.Module, at: Sequence[str | int]) -> list[nn.Module]:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many types for untraceable code
        raise ConversionError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Move data-dependent control flow out of forward(), or express the model as an "
            "nn.Sequential, or build a MultiExitNetwork from blocks directly"
        ) from exc
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConversionError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs; attach_exits "
            "supports models with exactly one tensor input"
        )
    positions = _module_positions(nodes)
    pos: list[int] = []
    for a in at:
        if str(a) not in positions:
            raise ConversionError(
                f"unknown layer name {a!r}; valid names (modules called in forward, in order) "
                f"are {sorted(positions, key=lambda k: (positions[k], k))}"
            )
        pos.append(positions[str(a)])
    output_idx = next(i for i, n in enumerate(nodes) if n.op == "output")
    pos = _check_cuts(pos, output_idx, list(at))
    index = {n: i for i, n in enumerate(nodes)}

    def live_after(p: int) -> list[torch.fx.Node]:
        return [
            n for n in nodes[: p + 1] if n.op != "get_attr" and any(index[u] > p for u in n.users)
        ]

    crossing: list[torch.fx.Node] = []
    for k, (p, name) in enumerate(
        zip(pos, sorted(at, key=lambda a: positions[str(a)]), strict=True)
    ):
        live = live_after(p)
        # a module's output is often merged by plain ops (``h + block(h)``): move the cut past
        # them, up to the next module call, to the first point where one value crosses
        while len(live) != 1 and nodes[p + 1].op not in ("call_module", "output"):
            p += 1
            live = live_after(p)
        if len(live) != 1:
            raise ConversionError(
                f"cannot cut after {name!r}: {len(live)} values cross that point "
                f"({[n.name for n in live]}), but an exit needs exactly one tensor h_i. "
                "Cut at a block boundary (e.g. after a whole residual block) instead"
            )
        pos[k] = p
        crossing.append(live[0])

    blocks: list[nn.Module] = []
    bounds = [-1, *pos, len(nodes) - 1]
    inputs = [placeholders[0], *crossing]
    for k in range(len(bounds) - 1):
        g = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {inputs[k]: g.placeholder("h")}

        def lookup(a: torch.fx.Node, env=env, g=g) -> torch.fx.Node:
            if a not in env:
                if a.op != "get_attr":  # pragma: no cover - liveness check guarantees this
                    raise ConversionError(f"internal: value {a.name} crosses a cut")
                env[a] = g.node_copy(a, lookup)
            return env[a]

        for node in nodes[bounds[k] + 1 : bounds[k + 1] + 1]:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                g.output(torch.fx.map_arg(node.args[0], lookup))
            else:
                env[node] = g.node_copy(node, lookup)
        if k < len(bounds) - 2:
            g.output(env[crossing[k]])
        blocks.append(torch.fx.GraphModule(gm, g, class_name=f"Block{k}"))
    return blocks


def split_model(model: nn.Module, at: Sequence[str | int]) -> list[nn.Module]:
    """Cut ``model`` into consecutive blocks, ending after each layer named in ``at``.

    Returns ``len(at) + 1`` modules that share parameters with ``model``; applied in order they
    compute ``model``'s output.
    """
    if isinstance(model, nn.Sequential) and all(
        isinstance(a, int) or str(a) in dict(model.named_children()) for a in at
    ):
        return _split_sequential(model, at)
    return _split_fx(model, at)


def attach_exits(
    model: nn.Module,
    at: Sequence[str | int],
    example_input: Tensor,
    head: str | HeadFactory | Sequence[str | HeadFactory] = "linear",
    *,
    num_classes: int | None = None,
    head_options: Mapping[str, object] | None = None,
) -> MultiExitNetwork:
    """Give an existing model early exits after the layers named in ``at``.

    The model's own output stays the final exit (its head is ``nn.Identity``); a new head is
    built for every cut from the shape of ``h_i`` on ``example_input``.

    Args:
        model: any ``nn.Module`` with one tensor input whose output is ``(B, num_classes)``.
        at: names of the layers after which to add an exit (``named_modules`` names, or child
            indices of an ``nn.Sequential``).
        example_input: one example batch, ``(B, ...)``; fixes the input shape and head sizes.
        head: a registered head name or factory, or one per exit.
        num_classes: classes per head; defaults to the model's output width.
        head_options: keyword options passed to every head factory.

    Returns:
        A ``MultiExitNetwork`` sharing parameters with ``model``.

    Raises:
        ConversionError: a name is unknown (the message lists the valid ones), a cut would need
            more than one tensor to cross, or tracing failed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> net = attach_exits(model, at=[2], example_input=torch.randn(1, 8, 8))
        >>> net.num_exits
        2
    """
    if not isinstance(example_input, Tensor) or example_input.dim() < 1:
        raise ShapeError("example_input must be a batched tensor (B, ...), e.g. x[:1]")
    blocks = split_model(model, list(at))
    heads_spec = list(head) if isinstance(head, (list, tuple)) else [head] * len(at)
    if len(heads_spec) != len(at):
        raise ConversionError(f"got {len(heads_spec)} heads for {len(at)} exits in `at`")
    shapes = block_output_shapes(blocks, example_input)
    if len(shapes[-1]) != 1:
        raise ConversionError(
            f"the model's output has per-sample shape {shapes[-1]}; expected (num_classes,)"
        )
    c = num_classes or shapes[-1][0]
    opts = dict(head_options or {})
    heads: dict[int, nn.Module] = {
        k: make_head(heads_spec[k], shapes[k], c, **opts) for k in range(len(at))
    }
    heads[len(blocks) - 1] = nn.Identity()
    return MultiExitNetwork(
        blocks, heads, input_shape=tuple(example_input.shape[1:]), num_classes=c
    )
