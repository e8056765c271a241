"""Turn an existing ``nn.Module`` into a :class:`MultiExitNetwork`.

``nn.Sequential`` models are sliced at top-level children; any other model is traced with
``torch.fx`` and its graph is cut after the named modules (the layers of an
``nn.TransformerEncoder`` included). A cut is only valid where exactly one tensor computed by
the model crosses it (that tensor is ``h_i``), besides side inputs computed from the input alone
(a padding mask), which travel with it: cutting inside a residual block, for instance, would
need two, and is refused with the names of the values that would cross.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
import torch.fx
from torch import Tensor, nn

from offramp.activations import Activation, features
from offramp.errors import ConversionError, ShapeError
from offramp.heads import HeadFactory, head_for
from offramp.network import MultiExitNetwork, block_outputs, evaluating

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


#: Containers whose layers are cut points: the tracer calls their layers one by one.
_UNROLLED = (nn.TransformerEncoder,)

#: Modules whose output is a sequence of token features ``(B, T, D)`` (batch first).
SEQUENCE_MODULES = (
    nn.TransformerEncoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoderLayer,
    nn.MultiheadAttention,
    nn.RNNBase,
)


class _Tracer(torch.fx.Tracer):
    """``torch.fx``'s tracer, with ``nn.TransformerEncoder`` unrolled into calls of its
    layers (then its norm), so that ``encoder.layers.<k>`` can be cut after. The layers keep
    their own masks. A container that takes the nested-tensor path (``enable_nested_tensor``,
    eligible layers, a padding mask) returns zeros at padding in eval mode without gradients;
    the unrolled form zeroes them always, so inference matches it exactly and training
    differs only at padded positions."""

    def call_module(self, m, forward, args, kwargs):  # type: ignore[no-untyped-def]
        if isinstance(m, _UNROLLED):
            return self._unrolled(m, args, kwargs)
        return super().call_module(m, forward, args, kwargs)

    def _unrolled(self, m: nn.TransformerEncoder, args, kwargs):  # type: ignore[no-untyped-def]
        names = ("src", "mask", "src_key_padding_mask", "is_causal")
        given = dict(zip(names, args, strict=False)) | dict(kwargs)
        out = given["src"]
        for layer in m.layers:
            out = layer(
                out,
                src_mask=given.get("mask"),
                src_key_padding_mask=given.get("src_key_padding_mask"),
                is_causal=bool(given.get("is_causal") or False),
            )
        out = m.norm(out) if m.norm is not None else out
        pad = given.get("src_key_padding_mask")
        if pad is not None and getattr(m, "use_nested_tensor", False):
            # the container's nested-tensor path (eval, no grad) returns zeros at padding
            out = out.masked_fill(pad.unsqueeze(-1), 0.0)
        return out


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


def _propagate_shapes(gm: torch.fx.GraphModule, example: Tensor) -> None:
    """Record what every node computes on ``example`` (``node.meta["tensor_meta"]``), in eval
    mode without gradients; every module gets its own mode back."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad(), evaluating(gm):
        ShapeProp(gm).propagate(example)


def _is_tensor(node: torch.fx.Node) -> bool | None:
    """Whether ``node`` computes one tensor (``None``: unknown, no shapes were propagated)."""
    kind = node.meta.get("type")
    return None if kind is None else issubclass(kind, Tensor)


def _side_inputs(nodes: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """Values that may cross a cut beside ``h_i``: boolean or integer tensors computed from
    the input alone, without any module or parameter — a padding mask (``x == 0``), lengths.
    The input itself and anything floating-point count as features (a skip connection from
    the input is not a side input). Known only once shapes were propagated."""
    free: set[torch.fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or (
            n.op in ("call_function", "call_method") and all(a in free for a in n.all_input_nodes)
        ):
            free.add(n)
    side = set()
    for n in free:
        meta = n.meta.get("tensor_meta")
        dtype = getattr(meta, "dtype", None)
        if n.op != "placeholder" and dtype is not None and not dtype.is_floating_point:
            side.add(n)
    return side


def _split_fx(
    model: nn.Module, at: Sequence[str | int], example_input: Tensor | None = None
) -> list[nn.Module]:
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
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
            "supports models with exactly one tensor input (derive masks or lengths from it "
            "inside forward, e.g. `pad = x == 0` for token ids)"
        )
    if example_input is not None:
        _propagate_shapes(gm, example_input)
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
    side = _side_inputs(nodes)

    def live_after(p: int) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
        """(features, side inputs) crossing a cut after node ``p``."""
        live = [
            n for n in nodes[: p + 1] if n.op != "get_attr" and any(index[u] > p for u in n.users)
        ]
        return [n for n in live if n not in side], [n for n in live if n in side]

    def ready(feats: list[torch.fx.Node], sides: list[torch.fx.Node]) -> bool:
        return len(feats) == 1 and all(_is_tensor(n) is not False for n in (*feats, *sides))

    crossing: list[list[torch.fx.Node]] = []
    for k, (p, name) in enumerate(
        zip(pos, sorted(at, key=lambda a: positions[str(a)]), strict=True)
    ):
        feats, sides = live_after(p)
        # a module's output is often merged by plain ops (``h + block(h)``) or unpacked
        # (``out, _ = self.rnn(x)``): move the cut past them, up to the next module call, to
        # the first point where one tensor h_i crosses (with side inputs, if any)
        while not ready(feats, sides) and nodes[p + 1].op not in ("call_module", "output"):
            p += 1
            feats, sides = live_after(p)
        if len(feats) != 1:
            raise ConversionError(
                f"cannot cut after {name!r}: {len(feats)} values cross that point "
                f"({[n.name for n in feats]}), but an exit needs exactly one tensor h_i "
                "(besides boolean or integer side inputs computed from the input alone, such "
                "as a padding mask). Cut at a block boundary (e.g. after a whole residual "
                "block) instead"
            )
        if not ready(feats, sides):
            module = model.get_submodule(str(name))
            raise ConversionError(
                f"cannot cut after {name!r} ({type(module).__name__}): its output is "
                f"{_describe(feats[0])}, not a tensor, and nothing in forward() takes a tensor "
                "out of it before the next layer. Unpack it in forward() (e.g. "
                "`out, _ = self.rnn(x)`) or wrap the layer in a module that returns one tensor"
            )
        pos[k] = p
        crossing.append(feats + sides)

    blocks: list[nn.Module] = []
    bounds = [-1, *pos, len(nodes) - 1]
    inputs = [[placeholders[0]], *crossing]
    for k in range(len(bounds) - 1):
        g = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        h = g.placeholder("h")
        if len(inputs[k]) == 1:
            env[inputs[k][0]] = h
        else:  # (h_i, *side inputs) arrive as one tuple
            for j, n in enumerate(inputs[k]):
                env[n] = g.call_function(operator.getitem, (h, j))

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
            out = [lookup(n) for n in crossing[k]]
            g.output(out[0] if len(out) == 1 else tuple(out))
        blocks.append(torch.fx.GraphModule(gm, g, class_name=f"Block{k}"))
    return blocks


def _describe(node: torch.fx.Node) -> str:
    kind = node.meta.get("type")
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, tuple):
        return f"a tuple of {len(meta)}"
    return "not a tensor" if kind is None else f"a {kind.__name__}"


def split_model(
    model: nn.Module, at: Sequence[str | int], example_input: Tensor | None = None
) -> list[nn.Module]:
    """Cut ``model`` into consecutive blocks, ending after each layer named in ``at``.

    Returns ``len(at) + 1`` modules that share parameters with ``model``; applied in order they
    compute ``model``'s output. Side inputs computed from the input alone (a padding mask
    ``x == 0``, lengths) travel beside ``h_i``: such a block returns ``(h_i, *side)`` and the
    next takes that tuple (:mod:`offramp.activations`). With ``example_input``, a layer that
    returns a tuple (``nn.GRU``, ``nn.LSTM``) is cut after the code that unpacks it.
    """
    if isinstance(model, nn.Sequential) and all(
        isinstance(a, int) or str(a) in dict(model.named_children()) for a in at
    ):
        return _split_sequential(model, at)
    return _split_fx(model, at, example_input)


def attach_exits(
    model: nn.Module,
    at: Sequence[str | int],
    example_input: Tensor,
    head: str | HeadFactory | Sequence[str | HeadFactory] | None = None,
    *,
    num_classes: int | None = None,
    head_options: Mapping[str, object] | None = None,
    trim_padding: bool = False,
) -> MultiExitNetwork:
    """Give an existing model early exits after the layers named in ``at``.

    The model's own output stays the final exit (its head is ``nn.Identity``); a new head is
    built for every cut from the shape of ``h_i`` on ``example_input``.

    Args:
        model: any ``nn.Module`` with one tensor input whose output is ``(B, num_classes)``.
        at: names of the layers after which to add an exit (``named_modules`` names, or child
            indices of an ``nn.Sequential``).
        example_input: one example batch, ``(B, ...)``; fixes the input shape and head sizes.
        head: a registered head name or factory, or one per exit; by default ``linear``, and
            ``mean`` on token features (after a transformer or recurrent layer, or with a
            padding mask).
        num_classes: classes per head; defaults to the model's output width.
        head_options: keyword options passed to every head factory.
        trim_padding: the model masks padding everywhere (e.g. a transformer given
            ``src_key_padding_mask = x == pad``), so the runtime may drop padding columns no
            live row needs (:attr:`MultiExitNetwork.trim_padding`), and token ids ``(B, T)`` of
            any length are accepted.

    Token features: after a transformer or recurrent layer (``(B, T, D)``) the ``pool`` head
    averages over the tokens; where a padding mask travels with them, only token heads
    (``mean``, ``cls``, ``last``) are accepted, and they pool over the real tokens.

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
    blocks = split_model(model, list(at), example_input)
    heads_spec = list(head) if isinstance(head, (list, tuple)) else [head] * len(at)
    if len(heads_spec) != len(at):
        raise ConversionError(f"got {len(heads_spec)} heads for {len(at)} exits in `at`")
    outs = block_outputs(blocks, example_input)
    final = features(outs[-1])
    if isinstance(outs[-1], tuple) or final.dim() != 2:
        raise ConversionError(
            f"the model's output has per-sample shape {tuple(final.shape[1:])}; expected "
            "(num_classes,)"
        )
    c = num_classes or final.shape[1]
    opts = dict(head_options or {})
    names = list(at)
    heads: dict[int, nn.Module] = {
        k: _head_at(model, names[k], heads_spec[k], outs[k], c, opts) for k in range(len(at))
    }
    heads[len(blocks) - 1] = nn.Identity()
    return MultiExitNetwork(
        blocks,
        heads,
        input_shape=_input_shape(example_input, trim_padding),
        num_classes=c,
        trim_padding=trim_padding,
    )


def _input_shape(example: Tensor, any_length: bool) -> tuple[int | None, ...]:
    """The per-sample input shape a network built on ``example`` accepts: with
    ``any_length`` (a network that masks padding), token ids ``(B, T)`` of any length ``T``."""
    shape: list[int | None] = list(example.shape[1:])
    if any_length and len(shape) == 1 and not example.is_floating_point():
        shape[0] = None
    return tuple(shape)


def _head_at(
    model: nn.Module,
    name: str | int,
    spec: str | HeadFactory | None,
    h: Activation,
    num_classes: int,
    options: dict[str, object],
) -> nn.Module:
    """The head of the exit after layer ``name``, for the activation ``h`` found there."""
    try:
        layer: nn.Module | None = model.get_submodule(str(name))
    except AttributeError:
        layer = None
    tokens = isinstance(layer, SEQUENCE_MODULES)
    return head_for(
        spec,
        h,
        num_classes,
        tokens=tokens,
        where=f"after {name!r}",
        error=ConversionError,
        **options,
    )
