"""The head zoo: exit classifiers ``c_i`` built from the per-sample shape of ``h_i`` alone.

Every head factory has the signature ``factory(in_shape, num_classes, **options) -> nn.Module``
where ``in_shape`` is the shape of one sample of ``h_i`` (no batch dimension). Register your own
with :func:`register_head`.

| name | input | what it is |
|---|---|---|
| ``linear`` | any | flatten, one linear layer |
| ``mlp`` | any | flatten, linear–ReLU–linear |
| ``pool`` | ``(C, *spatial)`` | global average pooling over the spatial dims, linear |
| ``mixpool`` | ``(C, H, W)`` | SDN-style learned max/avg pooling mix to a small grid, linear |
| ``conv`` | ``(C, H, W)`` | BranchyNet-style branch: 3×3 conv, 2×2 max-pool, ReLU, linear |
| ``mean`` | ``(T, D)`` tokens | mean over the real tokens (padding mask respected), linear |
| ``cls`` | ``(T, D)`` tokens | the first token (``[CLS]``, a ViT's class token), linear |
| ``last`` | ``(T, D)`` tokens | the last real token (a recurrent network's summary), linear |

Token heads read the padding mask that travels with the features (:mod:`offramp.activations`);
``mean``, ``cls`` and ``last`` take ``hidden=N`` for a hidden layer before the output. Any other
head on an activation that carries side inputs reads the features alone (:class:`OnFeatures`).

Non-neural heads: :class:`SklearnHead` wraps any scikit-learn classifier fitted on pooled
features of a frozen backbone (strategy ``"heads"`` with ``sklearn=…``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from offramp.activations import Activation, features, padding_mask
from offramp.errors import ConfigError, DataError, OfframpError

__all__ = [
    "HEADS",
    "SKLEARN_ESTIMATORS",
    "TOKEN_HEADS",
    "TRUSTED_SKLEARN_TYPES",
    "HeadFactory",
    "MixedPool2d",
    "OnFeatures",
    "SklearnHead",
    "TokenPool",
    "conv_head",
    "head_for",
    "linear_head",
    "load_sklearn_estimator",
    "make_head",
    "make_sklearn_estimator",
    "max_avg_pool2d",
    "mixpool_head",
    "mlp_head",
    "pool_features",
    "pool_head",
    "register_head",
    "token_head",
]

HeadFactory = Callable[..., nn.Module]
HEADS: dict[str, HeadFactory] = {}


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Decorator that adds a head factory to :data:`HEADS` under ``name``."""

    def deco(fn: HeadFactory) -> HeadFactory:
        HEADS[name] = fn
        return fn

    return deco


def make_head(
    head: str | HeadFactory, in_shape: Sequence[int], num_classes: int, **options: object
) -> nn.Module:
    """Build a head for per-sample input shape ``in_shape``.

    Args:
        head: a registered name (see :data:`HEADS`) or a factory callable.
        in_shape: shape of one sample of ``h_i``, e.g. ``(5, 15, 15)``.
        num_classes: number of outputs.
        **options: passed to the factory.

    Example:
        >>> import torch
        >>> head = make_head("pool", (8, 6, 6), 10)
        >>> tuple(head(torch.randn(4, 8, 6, 6)).shape)
        (4, 10)
    """
    if isinstance(head, str):
        if head not in HEADS:
            raise ConfigError(f"unknown head {head!r}; registered heads are {sorted(HEADS)}")
        factory = HEADS[head]
    else:
        factory = head
    if num_classes < 1:
        raise ConfigError(f"num_classes must be ≥ 1, got {num_classes}")
    return factory(tuple(int(s) for s in in_shape), int(num_classes), **options)


def _need_spatial(name: str, in_shape: tuple[int, ...], dims: int | None = None) -> None:
    ok = len(in_shape) >= 2 if dims is None else len(in_shape) == dims
    if not ok:
        want = "(C, H, W)" if dims == 3 else "(C, *spatial)"
        raise ConfigError(
            f"head {name!r} needs a feature map shaped {want} per sample, but h_i has shape "
            f"{in_shape}; use the 'linear' or 'mlp' head for flat features"
        )


@register_head("linear")
def linear_head(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Flatten ``h_i`` and apply one linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))


@register_head("mlp")
def mlp_head(in_shape: tuple[int, ...], num_classes: int, hidden: int | None = None) -> nn.Module:
    """Flatten, linear to ``hidden`` (default: half the input, between 16 and 256), ReLU, linear."""
    d = math.prod(in_shape)
    hidden = hidden or max(16, min(256, d // 2))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


class _GlobalAvgPool(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h.flatten(2).mean(dim=2)  # (B, C, *spatial) -> (B, C)


@register_head("pool")
def pool_head(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Global average pooling over all spatial dims, then a linear layer on the channels."""
    _need_spatial("pool", in_shape)
    return nn.Sequential(_GlobalAvgPool(), nn.Linear(in_shape[0], num_classes))


class OnFeatures(nn.Module):
    """Run ``head`` on the features of an activation that carries side inputs
    (``(h, *side)`` → ``head(h)``); a plain tensor goes to ``head`` as it is."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, h: Activation) -> Tensor:
        return self.head(features(h))


class TokenPool(nn.Module):
    """Token features ``(B, T, D)`` to one vector per sample ``(B, D)``, over the real tokens.

    Args:
        how: ``"mean"`` (mean over real tokens), ``"cls"`` (the first token) or ``"last"``
            (the last real token).

    The padding mask is read from the activation (:func:`offramp.activations.padding_mask`);
    without one, every token is real.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[1.0], [3.0], [100.0]]])  # (1, 3, 1); the third token is padding
        >>> pad = torch.tensor([[False, False, True]])
        >>> TokenPool("mean")((x, pad)).tolist(), TokenPool("last")((x, pad)).tolist()
        ([[2.0]], [[3.0]])
    """

    def __init__(self, how: str) -> None:
        super().__init__()
        if how not in ("mean", "cls", "last"):
            raise ConfigError(f"token pooling must be 'mean', 'cls' or 'last', got {how!r}")
        self.how = how

    def forward(self, h: Activation) -> Tensor:
        x = features(h)  # (B, T, D)
        if self.how == "cls":
            return x[:, 0]
        pad = padding_mask(h)
        if pad is None:
            return x.mean(dim=1) if self.how == "mean" else x[:, -1]
        if self.how == "mean":
            real = (~pad).unsqueeze(-1).to(x.dtype)  # (B, T) -> (B, T, 1)
            return (x * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)
        positions = torch.arange(x.shape[1], device=x.device).expand_as(pad)  # (B, T)
        last = positions.masked_fill(pad, -1).amax(dim=1).clamp_min(0)  # (B,) last real token
        return x[torch.arange(x.shape[0], device=x.device), last]


def _need_tokens(name: str, in_shape: tuple[int, ...]) -> None:
    if len(in_shape) != 2:
        raise ConfigError(
            f"head {name!r} needs token features shaped (T, D) per sample, but h_i has shape "
            f"{in_shape}; use 'pool' for a feature map or 'linear' for flat features"
        )


def token_head(
    how: str, in_shape: tuple[int, ...], num_classes: int, hidden: int | None = None
) -> nn.Module:
    """Pool tokens ``how`` (:class:`TokenPool`), then a linear layer (or, with ``hidden``,
    linear–ReLU–linear)."""
    _need_tokens(how, in_shape)
    d = in_shape[1]
    if hidden:
        return nn.Sequential(
            TokenPool(how), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
    return nn.Sequential(TokenPool(how), nn.Linear(d, num_classes))


@register_head("mean")
def mean_head(in_shape: tuple[int, ...], num_classes: int, hidden: int | None = None) -> nn.Module:
    """Mean over the real tokens of ``(T, D)`` features, then linear."""
    return token_head("mean", in_shape, num_classes, hidden)


@register_head("cls")
def cls_head(in_shape: tuple[int, ...], num_classes: int, hidden: int | None = None) -> nn.Module:
    """The first token of ``(T, D)`` features (``[CLS]``, a class token), then linear."""
    return token_head("cls", in_shape, num_classes, hidden)


@register_head("last")
def last_head(in_shape: tuple[int, ...], num_classes: int, hidden: int | None = None) -> nn.Module:
    """The last real token of ``(T, D)`` features (a recurrent layer's summary), then linear."""
    return token_head("last", in_shape, num_classes, hidden)


#: Heads that read the padding mask themselves (every other head is given the features alone).
TOKEN_HEADS = frozenset({"mean", "cls", "last"})


def head_for(
    spec: str | HeadFactory | None,
    h: Activation,
    num_classes: int,
    *,
    tokens: bool = False,
    where: str = "here",
    error: type[OfframpError] = ConfigError,
    **options: object,
) -> nn.Module:
    """The head for the activation ``h`` an exit sees (features, or ``(h, *side)``).

    Token features (``h`` carries a padding mask, or ``tokens`` says its ``(B, T, D)`` are
    tokens) get token heads: ``None`` and ``"pool"`` mean ``"mean"`` there, and a head that
    would read padded tokens as a fixed-size input is refused. Other heads given side inputs
    see the features alone (:class:`OnFeatures`). ``None`` elsewhere means ``"linear"``.

    Args:
        spec: head zoo name, factory, or ``None`` for the default.
        h: the activation on an example batch.
        num_classes: number of outputs.
        tokens: ``h``'s features are token features even without a padding mask.
        where: where the exit is, for the error message.
        error: the error class refusing a fixed-size head on padded tokens.
        **options: passed to the factory.

    Example:
        >>> import torch
        >>> head = head_for("pool", torch.randn(2, 5, 8), 3, tokens=True)
        >>> tuple(head(torch.randn(2, 5, 8)).shape)  # mean over the 5 tokens, then 8 -> 3
        (2, 3)
    """
    x, pad = features(h), padding_mask(h)
    tokens = pad is not None or (tokens and x.dim() == 3)
    if spec is None or (tokens and spec == "pool"):  # global pooling over tokens: their mean
        spec = "mean" if tokens else "linear"
    if pad is not None and isinstance(spec, str) and spec not in TOKEN_HEADS:
        raise error(
            f"head {spec!r} {where} would read padded token features (B, T, D) as a "
            f"fixed-size input; use a token head: {sorted(TOKEN_HEADS)}"
        )
    head = make_head(spec, tuple(x.shape[1:]), num_classes, **options)
    if isinstance(h, tuple) and not (isinstance(spec, str) and spec in TOKEN_HEADS):
        head = OnFeatures(head)
    return head


def _windows(n: int, size: int) -> list[tuple[int, int]]:
    """Adaptive pooling's windows along a dimension of ``n``: ``[⌊i·n/s⌋, ⌈(i+1)·n/s⌉)``."""
    return [((i * n) // size, -((-(i + 1) * n) // size)) for i in range(size)]


def max_avg_pool2d(h: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Adaptive max and average pooling of a ``(B, C, H, W)`` map to ``(B, C, size, size)``,
    written as window reductions over a ``(B, H, W, C)`` view so that ``torch.compile`` reads
    the map once for both, with the channels innermost.

    Equals ``(adaptive_max_pool2d(h, size), adaptive_avg_pool2d(h, size))`` (the averages up to
    float rounding). Inductor compiles it to one kernel whose vectorised loops keep the max and
    the sum of each window together, over the channels (no-exit runtime on the benchmark's
    Fashion-MNIST network, batch 256: 1 % faster than with the two adaptive poolings). In eager
    mode it is slower than they are, so :class:`MixedPool2d` uses it only when compiling
    without gradients.

    Example:
        >>> import torch
        >>> h = torch.randn(2, 3, 14, 14)
        >>> mx, av = max_avg_pool2d(h, 4)
        >>> torch.equal(mx, torch.nn.functional.adaptive_max_pool2d(h, 4))
        True
        >>> torch.allclose(av, torch.nn.functional.adaptive_avg_pool2d(h, 4), atol=1e-6)
        True
    """
    b, c, hh, ww = h.shape
    v = h.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C), a view on channels-last maps
    if hh % size == 0 and ww % size == 0:  # equal, disjoint windows: one reshape
        v = v.reshape(b, size, hh // size, size, ww // size, c)  # (B, s, kh, s, kw, C)
        mx, av = v.amax((2, 4)), v.mean((2, 4))  # (B, s, s, C)
    else:  # unequal or overlapping windows: one reduction per cell
        rows, cols = _windows(hh, size), _windows(ww, size)

        def grid(reduce: Callable[..., Tensor]) -> Tensor:  # (B, s, s, C)
            return torch.stack(
                [
                    torch.stack([reduce(v[:, r0:r1, c0:c1], (1, 2)) for c0, c1 in cols], 1)
                    for r0, r1 in rows
                ],
                1,
            )

        mx, av = grid(torch.amax), grid(torch.mean)
    return mx.permute(0, 3, 1, 2), av.permute(0, 3, 1, 2)  # (B, s, s, C) -> (B, C, s, s)


class MixedPool2d(nn.Module):
    """``σ(a)·maxpool(h) + (1 − σ(a))·avgpool(h)`` with a learned scalar ``a`` (SDN's mix).

    Pools a ``(B, C, H, W)`` map to ``(B, C, size, size)`` with adaptive pooling (for inference
    under ``torch.compile``, with :func:`max_avg_pool2d`, which computes the same in one pass).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.mix = nn.Parameter(torch.zeros(()))

    def forward(self, h: Tensor) -> Tensor:
        a = torch.sigmoid(self.mix)
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            # inference only: amax spreads its gradient over tied maxima (ReLU zeros tie often)
            # where adaptive max pooling picks one, so compiled training keeps the latter
            mx, av = max_avg_pool2d(h, self.size)
        else:
            mx = nn.functional.adaptive_max_pool2d(h, self.size)
            av = nn.functional.adaptive_avg_pool2d(h, self.size)
        return a * mx + (1 - a) * av


@register_head("mixpool")
def mixpool_head(in_shape: tuple[int, ...], num_classes: int, size: int = 4) -> nn.Module:
    """SDN-style head: learned max/avg pooling mix to a grid of at most ``size × size`` (and at
    most half the map), flatten, linear."""
    _need_spatial("mixpool", in_shape, dims=3)
    c, h, w = in_shape
    s = max(
        1, min(size, h // 2, w // 2)
    )  # at least halve the map, or max = avg and the mix is moot
    return nn.Sequential(MixedPool2d(s), nn.Flatten(), nn.Linear(c * s * s, num_classes))


@register_head("conv")
def conv_head(
    in_shape: tuple[int, ...], num_classes: int, channels: int | None = None
) -> nn.Module:
    """BranchyNet's branch shape: 3×3 conv (``channels``, default 2·C), ceil 2×2 max-pool, ReLU,
    linear."""
    _need_spatial("conv", in_shape, dims=3)
    c, h, w = in_shape
    k = channels or 2 * c
    oh, ow = math.ceil(h / 2), math.ceil(w / 2)
    return nn.Sequential(
        nn.Conv2d(c, k, 3, padding=1),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(k * oh * ow, num_classes),
    )


def pool_features(h: Tensor, size: int = 2) -> Tensor:
    """Fixed-size features of ``h_i``: ``(B, C, H, W)`` average-pooled to ``(B, C·size·size)``;
    other shapes flattened to ``(B, D)``.

    Example:
        >>> import torch
        >>> tuple(pool_features(torch.randn(3, 5, 9, 9)).shape)
        (3, 20)
    """
    if h.dim() == 4:
        h = nn.functional.adaptive_avg_pool2d(h, size)  # (B, C, H, W) -> (B, C, size, size)
    return h.flatten(1)  # (B, ...) -> (B, D)


#: scikit-learn classifiers by short name (constructed lazily; scikit-learn is an extra).
SKLEARN_ESTIMATORS = ("logistic", "tree", "svm", "forest")


def make_sklearn_estimator(name: str, seed: int = 0) -> object:
    """A fresh scikit-learn classifier by short name (:data:`SKLEARN_ESTIMATORS`)."""
    try:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC
        from sklearn.tree import DecisionTreeClassifier
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "non-neural heads need scikit-learn: pip install 'offramp[sklearn]'"
        ) from exc
    if name == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    if name == "tree":
        return DecisionTreeClassifier(max_depth=12, random_state=seed)
    if name == "svm":
        return make_pipeline(
            StandardScaler(), CalibratedClassifierCV(SVC(random_state=seed), ensemble=False)
        )
    if name == "forest":
        return RandomForestClassifier(n_estimators=50, max_depth=12, random_state=seed, n_jobs=1)
    raise ConfigError(f"unknown scikit-learn head {name!r}; choose one of {SKLEARN_ESTIMATORS}")


#: Types that scikit-learn estimators of :data:`SKLEARN_ESTIMATORS` hold beyond what skops
#: trusts by default; :func:`load_sklearn_estimator` accepts these and no others.
TRUSTED_SKLEARN_TYPES: tuple[str, ...] = (
    "sklearn.tree._tree.Tree",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
)


def _skops_io() -> Any:
    try:
        import skops.io
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "saving or loading scikit-learn heads needs skops: pip install 'offramp[sklearn]'"
        ) from exc
    return skops.io


def load_sklearn_estimator(data: bytes, trusted: Sequence[str] = ()) -> object:
    """An estimator from ``skops`` bytes, trusting skops's defaults,
    :data:`TRUSTED_SKLEARN_TYPES` and ``trusted`` only (never pickle).

    Raises:
        DataError: the bytes are not skops, or hold a type nobody trusted (the message lists
            them; pass their names as ``trusted`` once you have checked the file's source).

    Example:
        >>> import numpy as np, skops.io
        >>> est = make_sklearn_estimator("tree").fit(np.eye(3), [0, 1, 2])
        >>> type(load_sklearn_estimator(skops.io.dumps(est))).__name__
        'DecisionTreeClassifier'
    """
    sio = _skops_io()
    allowed = [*TRUSTED_SKLEARN_TYPES, *trusted]
    try:
        untrusted = [t for t in sio.get_untrusted_types(data=data) if t not in allowed]
    except Exception as exc:  # skops raises several types on bytes that are not its format
        raise DataError(
            f"a scikit-learn head's state is not in skops format ({type(exc).__name__}: {exc})"
        ) from exc
    if untrusted:
        raise DataError(
            f"a scikit-learn head's state holds types offramp does not trust: {untrusted}; if "
            "you trust the file, load the estimator with load_sklearn_estimator(data, "
            "trusted=[...]) naming them"
        )
    return sio.loads(data, trusted=allowed)


class SklearnHead(nn.Module):
    """A non-neural exit head: any scikit-learn classifier on pooled features of ``h_i``.

    Its output is ``log predict_proba`` laid out over all ``num_classes`` (classes the
    estimator never saw get ``log 1e-12``), so every policy (entropy, max-prob …) and the eager
    runtime treat it like a neural head's logits. It runs on the host through NumPy: it has no
    gradient and cannot be traced (``traceable = False``; the runtime's ``"script"`` mode
    refuses it). Its FLOPs are not visible to ``torch.utils.flop_counter``; :meth:`extra_flops`
    gives an estimate that :func:`offramp.costs.count_flops` adds. The fitted estimator is kept
    in the module's state dict (``get_extra_state``) in scikit-learn's secure ``skops`` format,
    so checkpoints carry it and read back without pickle.

    Args:
        estimator: an unfitted scikit-learn classifier, or a name in
            :data:`SKLEARN_ESTIMATORS`.
        num_classes: classes ``C``.
        pool_size: spatial size of the average pooling of ``(C, H, W)`` features.

    Example:
        >>> import torch
        >>> head = SklearnHead("logistic", num_classes=3)
        >>> h, y = torch.randn(30, 4), torch.arange(30) % 3
        >>> tuple(head.fit(h, y)(h).shape)
        (30, 3)
    """

    traceable = False

    def __init__(self, estimator: object | str, num_classes: int, pool_size: int = 2) -> None:
        super().__init__()
        self.estimator = (
            make_sklearn_estimator(estimator) if isinstance(estimator, str) else estimator
        )
        self.num_classes = int(num_classes)
        self.pool_size = int(pool_size)
        self.fitted = False
        self._dim = 0

    def features(self, h: Tensor) -> Tensor:
        """The pooled features the estimator sees, ``(B, D)``."""
        return pool_features(h.detach(), self.pool_size).float()

    def fit(self, h: Tensor, y: Tensor) -> SklearnHead:
        """Fit the estimator on features ``h`` ``(N, ...)`` and labels ``y`` ``(N,)``."""
        z = self.features(h).cpu().numpy()
        self.estimator.fit(z, y.cpu().numpy())  # type: ignore[attr-defined]
        self._dim = z.shape[1]
        self.fitted = True
        return self

    def forward(self, h: Tensor) -> Tensor:
        if not self.fitted:
            raise ConfigError(
                "this SklearnHead is not fitted yet: call head.fit(h, y), or train with "
                "strategy 'heads' and the sklearn option"
            )
        z = self.features(h).cpu().numpy()
        proba = self.estimator.predict_proba(z)  # type: ignore[attr-defined]
        classes = torch.as_tensor(self.estimator.classes_, dtype=torch.long)  # type: ignore[attr-defined]
        out = torch.full((h.shape[0], self.num_classes), math.log(1e-12))
        out[:, classes] = torch.from_numpy(proba).float().clamp_min(1e-12).log()
        return out.to(h.device)

    def extra_flops(self, batch: int) -> int:
        """Estimated FLOPs of ``predict_proba`` on ``batch`` samples (what the estimator does
        per sample: a dot product per class for linear models, one comparison per tree level,
        a kernel evaluation per support vector)."""
        d, c = max(self._dim, 1), self.num_classes
        est = self.estimator
        steps = getattr(est, "steps", None)
        if steps:
            est = steps[-1][1]
            d_scale = 2 * d  # the scaler
        else:
            d_scale = 0
        calibrated = getattr(est, "calibrated_classifiers_", None)
        if calibrated:
            est = calibrated[0].estimator
        if hasattr(est, "coef_"):
            per = 2 * d * c
        elif hasattr(est, "support_vectors_"):
            per = 3 * d * len(est.support_vectors_)
        elif hasattr(est, "estimators_"):
            per = sum(t.get_depth() for t in est.estimators_) + c * len(est.estimators_)
        elif hasattr(est, "get_depth"):
            per = est.get_depth() + c
        else:
            per = 2 * d * c
        return int(batch * (per + d_scale))

    def get_extra_state(self) -> dict[str, object]:
        """The fitted estimator in scikit-learn's secure ``skops`` format, as a ``uint8``
        tensor, beside the head's settings: a checkpoint holding it reads back with
        ``torch.load(..., weights_only=True)``, no pickle involved."""
        state: dict[str, object] = {
            "fitted": self.fitted,
            "dim": self._dim,
            "pool_size": self.pool_size,
            "num_classes": self.num_classes,
        }
        if self.fitted:
            state["skops"] = torch.frombuffer(
                bytearray(_skops_io().dumps(self.estimator)), dtype=torch.uint8
            )
        return state

    def set_extra_state(self, state: dict[str, object]) -> None:
        if "estimator" in state:  # offramp < 0.2 pickled the estimator
            raise DataError(
                "this SklearnHead state holds a pickled estimator (written by an older offramp), "
                "which offramp no longer reads: retrain the heads (strategy 'heads' with sklearn)"
            )
        if "skops" in state:
            blob = state["skops"]
            if not isinstance(blob, Tensor) or blob.dtype != torch.uint8:
                raise DataError("SklearnHead state: 'skops' must be a uint8 tensor of skops bytes")
            self.estimator = load_sklearn_estimator(blob.numpy().tobytes())
        self.fitted = bool(state["fitted"])
        self._dim = int(state["dim"])  # type: ignore[arg-type]
        self.pool_size = int(state.get("pool_size", self.pool_size))  # type: ignore[arg-type]
        self.num_classes = int(state.get("num_classes", self.num_classes))  # type: ignore[arg-type]
