"""Scoring ops of cusprun: each op has a plain-PyTorch reference here and kernels behind one selector.

Each op's backend (``CUSPRUN_BACKEND``) is resolved and verified once per case in
:mod:`cusprun_kernels.backend`, the one table of implementations.

Ops (all on packed documents: ``offsets`` is a :class:`~cusprun_kernels.segments.Segments`, built once
per batch so launches never sync with the device, or an offsets tensor [n_docs + 1]):

* :func:`projection_energies` — y = x Wᵀ (+ b) with per-document row and column energies;
* :func:`qk_row_ablation` — exact block-output change of removing each q and k row;
* :func:`v_row_energies` — block-output change of removing each v row (linear, no recompute);
* :func:`gram` — XᵀX of a projection's input over a batch (the statistics of ``--compensate``).
"""

from __future__ import annotations

from .backend import BackendUnavailable, backend_status, implementation, resolve_backend, set_quiet
from .segments import Segments


def projection_energies(x, weight, bias, offsets):
    """See :mod:`cusprun_kernels.projection_energy`."""
    args = (x, weight, bias, offsets)
    return implementation("projection_energies", args, {})(*args)


def qk_row_ablation(q, k, v, cos, sin, w_o, offsets, **kw):
    """See :mod:`cusprun_kernels.qk_ablation`."""
    args = (q, k, v, cos, sin, w_o, offsets)
    return implementation("qk_row_ablation", args, kw)(*args, **kw)


def v_row_energies(o_in, w_o, offsets, **kw):
    """See :mod:`cusprun_kernels.v_row_energy`."""
    args = (o_in, w_o, offsets)
    return implementation("v_row_energies", args, kw)(*args, **kw)


def gram(x):
    """See :mod:`cusprun_kernels.gram`."""
    return implementation("gram", (x,), {})(x)


__all__ = ["BackendUnavailable", "Segments", "backend_status", "resolve_backend", "set_quiet",
           "projection_energies", "qk_row_ablation", "v_row_energies", "gram"]
