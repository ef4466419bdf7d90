"""Rotary-embedding helpers shared by the ablation ops (Hugging Face ``rotate_half`` convention)."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd], cos/sin [T, hd] -> x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_partner(head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each dimension d: its rotary partner p(d) and the sign s(d) with rotate_half(e_d) = s(d)·e_p(d).

    Zeroing dimension d of a pre-RoPE vector x therefore changes the rotated vector by
    -x_d·(cos_d·e_d + s(d)·sin_p(d)·e_p(d)): the partner moves too.
    """
    half = head_dim // 2
    d = torch.arange(head_dim, device=device)
    partner = (d + half) % head_dim
    sign = torch.where(d < half, 1.0, -1.0).to(device)
    return partner, sign
