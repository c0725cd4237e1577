"""The exact and composite passes on a GPU (PyTorch), for ``device="cuda"``.

The rows are moved to the device once, in float64; each pass then computes the loss, the
gradient, the Hessian and the meat there and returns them to the host as a :class:`Pass`, where
the Newton solvers do their ``d x d`` algebra as on the CPU. The formulas are those of
:func:`fedgrain.core.likelihood.exact_pass` and :func:`~fedgrain.core.likelihood.composite_pass`
(logit link), written for tensors; in float64 the results equal the CPU passes up to the order
of summation (to 1e-10 relative in the tests, and the fitted parameters to 1e-8).

PyTorch is optional: nothing here is imported unless a device is asked for, and asking for
one where PyTorch or a GPU is missing is a clear error. ``device="cpu"`` runs these same tensor
passes on the CPU (for checking them where no GPU is present).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..exceptions import ParameterError
from .likelihood import MEATS, Pass

#: Elements per block temporary on the device: a block has ``2**25 / (p + 4 (K - 1))`` rows
#: (at most ``2**20``), so its temporaries stay near 256 MB whatever ``n`` and ``K`` are.
BLOCK_ELEMENTS = 1 << 25
DEVICE_BLOCK = 1 << 20


def torch_device(device: Any):
    """The ``torch.device`` for ``device`` ("cuda", "cuda:1", "cpu" or a torch device), or a
    :class:`ParameterError` saying what is missing (PyTorch, a GPU)."""
    try:
        import torch
    except ImportError:
        raise ParameterError(
            f"device={device!r} runs the passes with PyTorch, which is not installed here; "
            "install it (pip install torch) or leave device=None."
        ) from None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"device must be None, 'cuda', 'cuda:N' or 'cpu'; got {device!r}."
                             ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(
            f"device={device!r} needs a CUDA GPU, and PyTorch sees none here; leave "
            "device=None to fit on the CPU."
        )
    if dev.type not in ("cuda", "cpu"):
        raise ParameterError(f"device must be None, 'cuda', 'cuda:N' or 'cpu'; got {device!r}.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ParameterError(f"device={device!r}: PyTorch sees {torch.cuda.device_count()} "
                             "GPU(s) here, numbered from 0.")
    return dev


def device_of(X: Any) -> str | None:
    """The device of a GPU array given as input (a CUDA torch tensor or a CuPy array), else
    None."""
    mod = type(X).__module__
    if mod.startswith("torch") and getattr(getattr(X, "device", None), "type", "") == "cuda":
        return str(X.device)
    if mod.startswith("cupy"):
        return f"cuda:{X.device.id}"
    return None


def on_host(a: Any) -> Any:
    """A GPU array (torch tensor, CuPy array) as a numpy array on the host; anything else as
    it is. The checks of the input run on the host; the passes then use the device."""
    mod = type(a).__module__
    if mod.startswith("torch") and hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if mod.startswith("cupy") and hasattr(a, "get"):
        return a.get()
    return a


class DeviceRows:
    """Rows on a device: features ``X`` (float64), class codes ``y``, weights ``w`` (or None)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, w: np.ndarray | None, device):
        import warnings

        import torch

        self.torch = torch
        self.device = torch_device(device)
        with warnings.catch_warnings():  # read-only inputs (memory-mapped shards) are only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.X = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float64),
                                     device=self.device)
            self.y = torch.as_tensor(np.asarray(y, dtype=np.int64), device=self.device)
            self.w = None if w is None else torch.as_tensor(np.asarray(w, dtype=np.float64),
                                                            device=self.device)
        self.n, self.p = X.shape
        self.block = DEVICE_BLOCK

    def _t(self, a: np.ndarray):
        return self.torch.as_tensor(np.asarray(a, dtype=np.float64), device=self.device)

    def _block(self, n_thresholds: int) -> int:
        return int(max(1024, min(DEVICE_BLOCK, BLOCK_ELEMENTS // (self.p + 4 * n_thresholds))))

    def blocks(self, n_thresholds: int = 1):
        step = self._block(n_thresholds)
        for a in range(0, self.n, step):
            b = min(a + step, self.n)
            yield (self.X[a:b], self.y[a:b],
                   self.torch.ones(b - a, dtype=self.X.dtype, device=self.device)
                   if self.w is None else self.w[a:b])

    def exact_oracle(self, shift: np.ndarray | None = None):
        """An oracle ``(x, loss, order, meat) -> Pass`` of the exact likelihood on the device,
        as the CPU one of :class:`fedgrain.OrdinalRegression`."""
        p = self.p

        def oracle(x, loss=True, order=2, meat=False):
            return self.exact_pass(x[:p], x[p:], order=order, meat=meat, shift=shift)

        return oracle

    # ---- the exact likelihood ---------------------------------------------------------------
    def exact_pass(self, beta, theta, *, order: int = 2, meat: bool = False,
                   shift: np.ndarray | None = None) -> Pass:
        """:func:`fedgrain.core.likelihood.exact_pass` (logit link) on the device."""
        torch = self.torch
        p, K1 = self.p, theta.shape[0]
        d = p + K1
        b, t = self._t(beta), self._t(theta)
        s = None if shift is None else self._t(shift)
        inf = torch.tensor([np.inf], dtype=t.dtype, device=self.device)
        t_ext = torch.cat([-inf, t, inf])
        levels = torch.arange(K1, device=self.device)
        total = torch.zeros((), dtype=t.dtype, device=self.device)
        grad = torch.zeros(d, dtype=t.dtype, device=self.device)
        hess = torch.zeros((d, d), dtype=t.dtype, device=self.device)
        mt = torch.zeros((d, d), dtype=t.dtype, device=self.device) if meat else None
        ls = torch.nn.functional.logsigmoid
        for Xb, yb, wb in self.blocks(K1):
            if s is not None:
                Xb = Xb - s
            eta = Xb @ b
            a1 = t_ext[yb + 1] - eta
            a0 = t_ext[yb] - eta
            log_gap = torch.log(-torch.expm1(a0 - a1))
            logpi = ls(a1) + ls(-a0) + log_gap
            total = total - wb @ logpi
            if order == 0 and not meat:
                continue
            g1 = torch.exp(ls(-a1) - ls(-a0) - log_gap)
            g0 = torch.exp(ls(a0) - ls(a1) - log_gap)
            up = (yb[:, None] == levels[None, :]).to(t.dtype)
            lo = (yb[:, None] == levels[None, :] + 1).to(t.dtype)
            deta = g0 - g1
            if order >= 1:
                grad[:p] -= Xb.T @ (wb * deta)
                grad[p:] += (wb * g0) @ lo - (wb * g1) @ up
            if meat:
                S = up * g1[:, None] - lo * g0[:, None]
                Z = Xb * (torch.sqrt(wb) * torch.abs(deta))[:, None]
                mt[:p, :p] += Z.T @ Z
                mt[:p, p:] += Xb.T @ (S * (wb * deta)[:, None])
                mt[p:, p:] += (S * wb[:, None]).T @ S
            if order >= 2:
                r1 = 1.0 - 2.0 * torch.sigmoid(a1)
                r0 = 1.0 - 2.0 * torch.sigmoid(a0)
                h11 = g1 * r1 - g1 * g1
                h00 = -g0 * r0 - g0 * g0
                h10 = g1 * g0
                c_eta = torch.clamp(-(h11 + 2.0 * h10 + h00), min=0.0)
                Z = Xb * torch.sqrt(wb * c_eta)[:, None]
                hess[:p, :p] += Z.T @ Z
                C = up * (wb * (h11 + h10))[:, None] + lo * (wb * (h10 + h00))[:, None]
                hess[:p, p:] += Xb.T @ C
                idx = torch.arange(K1, device=self.device)
                hess[p + idx, p + idx] -= (wb * h11) @ up + (wb * h00) @ lo
                off = (wb * h10) @ lo
                hess[p + idx[:-1], p + idx[:-1] + 1] -= off[:-1]
                hess[p + idx[:-1] + 1, p + idx[:-1]] -= off[:-1]
        hess[p:, :p] = hess[:p, p:].T
        if mt is not None:
            mt[p:, :p] = mt[:p, p:].T
        return Pass(float(total), _host(grad) if order >= 1 else None,
                    _host(hess) if order >= 2 else None, None if mt is None else _host(mt))

    # ---- the composite likelihood -------------------------------------------------------------
    def composite_pass(self, beta, theta, *, thresholds=None, loss: bool = True,
                       order: int = 2, meat: str | None = None, w=None) -> Pass:
        """:func:`fedgrain.core.likelihood.composite_pass` (logit link) on the device; ``w``
        replaces the rows' weights (a subset's selection, as the CPU oracle's)."""
        torch = self.torch
        if meat is not None and meat not in MEATS:
            raise ValueError(f"meat must be one of {MEATS} or None; got {meat!r}.")
        p = self.p
        ks = np.arange(theta.shape[0]) if thresholds is None else np.asarray(thresholds)
        kk = ks.shape[0]
        d = p + kk
        b = self._t(beta)
        th = self._t(np.asarray(theta)[ks])
        n_cls = theta.shape[0] + 1
        below = torch.as_tensor(ks[None, :] < np.arange(n_cls)[:, None], device=self.device)
        u_half = below.to(th.dtype) - 0.5
        total = torch.zeros((), dtype=th.dtype, device=self.device)
        grad = torch.zeros(d, dtype=th.dtype, device=self.device)
        hess = torch.zeros((d, d), dtype=th.dtype, device=self.device)
        mt = torch.zeros((d, d), dtype=th.dtype, device=self.device) if meat else None
        weights = self.w if w is None else self._t(w)
        step = self._block(kk)
        for a in range(0, self.n, step):
            z = min(a + step, self.n)
            Xb, yb = self.X[a:z], self.y[a:z]
            wb = (torch.ones(z - a, dtype=th.dtype, device=self.device) if weights is None
                  else weights[a:z])
            eta = Xb @ b
            A = eta[:, None] - th[None, :]  # the binary rows' log-odds, eta - theta_k
            U = below[yb]
            if loss:
                # -log P(u | A) = softplus(A) - u A
                rows = (torch.nn.functional.softplus(A) - U.to(A.dtype) * A).sum(dim=1)
                total = total + wb @ rows
            if order == 0 and meat is None:
                continue
            E = u_half[yb] - 0.5 * torch.tanh(0.5 * A)  # u - sigmoid(A)
            r = E.sum(dim=1)
            if order >= 1:
                grad[:p] -= Xb.T @ (wb * r)
                grad[p:] += wb @ E
            if order >= 2:
                V = 0.25 - 0.25 * torch.tanh(0.5 * A) ** 2  # sigmoid(A) (1 - sigmoid(A))
                vs = V.sum(dim=1)
                Z = Xb * torch.sqrt(wb * vs)[:, None]
                hess[:p, :p] += Z.T @ Z
                hess[:p, p:] -= Xb.T @ (V * wb[:, None])
                hess[p:, p:] += torch.diag(wb @ V)
            if meat is not None:
                if meat == "cluster":
                    m_row, m_cross = r * r, E * r[:, None]
                    mt[p:, p:] += (E * wb[:, None]).T @ E
                else:
                    m_cross = E * E
                    m_row = m_cross.sum(dim=1)
                    mt[p:, p:] += torch.diag(wb @ m_cross)
                Z = Xb * torch.sqrt(wb * m_row)[:, None]
                mt[:p, :p] += Z.T @ Z
                mt[:p, p:] -= Xb.T @ (m_cross * wb[:, None])
        hess[p:, :p] = hess[:p, p:].T
        if mt is not None:
            mt[p:, :p] = mt[:p, p:].T
        return Pass(float(total) if loss else None, _host(grad) if order >= 1 else None,
                    _host(hess) if order >= 2 else None, None if mt is None else _host(mt))


def _host(t) -> np.ndarray:
    return t.detach().cpu().numpy()
