"""Scoring ops of cusprun: each op has a plain-PyTorch reference here and kernels behind one selector.

Ops (all on packed documents: ``offsets`` is a :class:`~cusprun_kernels.segments.Segments`, built once
per batch so launches never sync with the device, or an offsets tensor [n_docs + 1]):

* :func:`projection_energies` — y = x Wᵀ (+ b) with per-document row and column energies;
* :func:`qk_row_ablation` — exact block-output change of removing each q and k row;
* :func:`v_row_energies` — block-output change of removing each v row (linear, no recompute).
"""

from __future__ import annotations

from .backend import BackendUnavailable, backend_status, resolve_backend, set_quiet
from .projection_energy import projection_energies_cuda, projection_energies_torch, projection_energies_triton
from .qk_ablation import qk_row_ablation_cuda, qk_row_ablation_torch, qk_row_ablation_triton
from .segments import Segments
from .v_row_energy import v_row_energies_torch

# v-row energies are two small einsums over data already on the device (O(T·hd·rep²)); every
# backend runs them through torch, which dispatches them to cuBLAS on a GPU.
_IMPLEMENTATIONS = {
    "projection_energies": {"torch": projection_energies_torch, "triton": projection_energies_triton,
                            "cuda": projection_energies_cuda},
    "qk_row_ablation": {"torch": qk_row_ablation_torch, "triton": qk_row_ablation_triton, "cuda": qk_row_ablation_cuda},
    "v_row_energies": {"torch": v_row_energies_torch, "triton": v_row_energies_torch, "cuda": v_row_energies_torch},
}


def _dispatch(op: str, device_type: str):
    return _IMPLEMENTATIONS[op][resolve_backend(device_type)]


def projection_energies(x, weight, bias, offsets):
    """See :mod:`cusprun_kernels.projection_energy`."""
    return _dispatch("projection_energies", x.device.type)(x, weight, bias, offsets)


def qk_row_ablation(q, k, v, cos, sin, w_o, offsets, **kw):
    """See :mod:`cusprun_kernels.qk_ablation`."""
    return _dispatch("qk_row_ablation", q.device.type)(q, k, v, cos, sin, w_o, offsets, **kw)


def v_row_energies(o_in, w_o, offsets, **kw):
    """See :mod:`cusprun_kernels.v_row_energy`."""
    return _dispatch("v_row_energies", o_in.device.type)(o_in, w_o, offsets, **kw)


__all__ = ["BackendUnavailable", "Segments", "backend_status", "resolve_backend", "set_quiet",
           "projection_energies", "qk_row_ablation", "v_row_energies"]
