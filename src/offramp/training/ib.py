"""Information-bottleneck local loss (survey §7.3, eq. 15), estimated with HSIC.

Eq. 15 asks each layer to minimise ``I(X; H_i) − β · I(H_i; Y)``: forget what of the input does
not matter, keep what predicts the label. Mutual information is hard to estimate from a
mini-batch, so, as the HSIC bottleneck (Ma, Lewis & Kleijn 2020) does, offramp replaces it by
the **Hilbert–Schmidt independence criterion**, a kernel measure of dependence that is zero iff
the variables are independent (for characteristic kernels)::

    HSIC(K, L) = tr(K H L H) / (m − 1)²,    H = I − 1 1ᵀ / m                (biased estimator)
    nHSIC(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))   ∈ [0, 1]

over a batch of ``m`` samples, with Gaussian kernels ``K_ab = exp(−‖x_a − x_b‖² / (2σ²))`` on the
flattened inputs and features (``σ`` = the median pairwise distance in the batch unless given)
and the linear kernel ``L = Y Yᵀ`` on one-hot labels. The local loss is::

    J_i^IB = nHSIC(X, H_i) − β · nHSIC(H_i, Y)

The normalised form makes ``β`` independent of the feature scale. It is a biased,
batch-level estimate: use batches of at least ~64 samples. :func:`offramp.training.train` with
strategy ``"ib"`` uses it as the per-block loss of layer-wise training (each block trained by
``J^IB``, its exit head by cross-entropy on the detached features).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from offramp.errors import ConfigError
from offramp.network import MultiExitNetwork

__all__ = ["IBLocalLoss", "gaussian_kernel", "hsic", "ib_loss", "normalized_hsic"]


def gaussian_kernel(x: Tensor, sigma: float | None = None) -> Tensor:
    """Gaussian kernel matrix of the rows of ``x`` (flattened), ``(m, m)``.

    ``sigma=None`` takes the median of the positive pairwise distances (median heuristic;
    treated as a constant, no gradient flows through it).

    Example:
        >>> import torch
        >>> k = gaussian_kernel(torch.tensor([[0.0], [1.0]]), sigma=1.0)
        >>> [[round(float(v), 4) for v in row] for row in k]
        [[1.0, 0.6065], [0.6065, 1.0]]
    """
    x = x.flatten(1)  # (m, ...) -> (m, D)
    d2 = torch.cdist(x, x).pow(2)  # (m, m)
    if sigma is None:
        with torch.no_grad():
            pos = d2[d2 > 0]
            s2 = float(pos.median()) if pos.numel() else 1.0
    else:
        if sigma <= 0:
            raise ConfigError(f"sigma must be > 0, got {sigma}")
        s2 = float(sigma) ** 2
    return torch.exp(-d2 / (2 * s2))


def hsic(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    """Biased HSIC estimator ``tr(K H L H) / (m − 1)²`` of two ``(m, m)`` kernel matrices.

    Example:
        >>> import torch
        >>> k = torch.eye(3)
        >>> round(float(hsic(k, k)), 4)  # tr(H H) / 4 = 2 / 4
        0.5
    """
    m = k.shape[0]
    if m < 2 or k.shape != l.shape:
        raise ConfigError(f"HSIC needs two (m, m) kernels with m ≥ 2, got {k.shape}, {l.shape}")
    kc = k - k.mean(dim=0, keepdim=True)  # K H (centre the columns)
    lc = l - l.mean(dim=0, keepdim=True)  # L H
    return (kc * lc.t()).sum() / (m - 1) ** 2  # tr(KH · LH) = Σ_ab (KH)_ab (LH)_ba


def normalized_hsic(k: Tensor, l: Tensor, eps: float = 1e-12) -> Tensor:  # noqa: E741
    """``HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))``, in ``[0, 1]``."""
    return hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l) + eps)


def ib_loss(
    x: Tensor, h: Tensor, y: Tensor, num_classes: int, beta: float = 5.0, sigma: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 15 with nHSIC: ``nHSIC(X, H) − β · nHSIC(H, Y)``.

    Args:
        x: the network's inputs for the batch, ``(m, ...)``.
        h: the block's output for the batch, ``(m, ...)``.
        y: labels ``(m,)``.
        num_classes: classes, for the one-hot label kernel.
        beta: weight of the relevance term.
        sigma: Gaussian kernel width for ``H`` (``None``: median heuristic); the kernel on
            ``X`` always uses its own median heuristic, since the two spaces differ in scale.

    Returns:
        ``(loss, nHSIC(X, H), nHSIC(H, Y))``.
    """
    kx = gaussian_kernel(x.detach())  # the input's own median-heuristic width
    kh = gaussian_kernel(h, sigma)
    onehot = F.one_hot(y, num_classes).to(h.dtype)  # (m,) -> (m, C)
    ly = onehot @ onehot.t()  # (m, m)
    ixh = normalized_hsic(kx, kh)
    ihy = normalized_hsic(kh, ly)
    return ixh - beta * ihy, ixh, ihy


class IBLocalLoss:
    """Strategy for one stage of layer-wise training: ``J^IB`` trains the body, cross-entropy on
    the detached features trains the head.

    It expects batches ``(h_prev, y, x)``: the stage's cached input, the labels and the original
    input (for ``nHSIC(X, H)``); :func:`~offramp.training.layerwise.fit_layerwise` provides them.

    Args:
        num_classes: classes ``C``.
        beta: relevance weight ``β``.
        sigma: kernel width (``None``: median heuristic per batch).
        loss_fn: the head's loss.
    """

    ddp_compatible = False

    def __init__(
        self,
        num_classes: int,
        beta: float = 5.0,
        sigma: float | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    ) -> None:
        if beta < 0:
            raise ConfigError(f"beta must be ≥ 0, got {beta}")
        self.num_classes = int(num_classes)
        self.beta = float(beta)
        self.sigma = sigma
        self.loss_fn = loss_fn

    def step(self, net: MultiExitNetwork, batch: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """``J^IB`` of the stage's body + the head's loss on detached features."""
        if len(batch) != 3:
            raise ConfigError("IBLocalLoss needs batches (h_prev, y, x); use fit_layerwise")
        h_prev, y, x = batch
        h = h_prev
        for block in net.blocks:  # the stage's body (no head: it learns from detached h below)
            h = block(h)
        ib, ixh, ihy = ib_loss(x, h, y, self.num_classes, self.beta, self.sigma)
        logits = net.heads[-1](h.detach())
        head_loss = self.loss_fn(logits, y)
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == y).sum()[None]  # (1,)
        return {
            "loss": ib + head_loss,
            "exit_losses": head_loss.detach()[None],
            "correct": correct,
            "ib_loss": ib.detach(),
            "hsic_xh": ixh.detach(),
            "hsic_hy": ihy.detach(),
        }
