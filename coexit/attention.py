"""Masked scaled-dot-product attention over explicit query and key positions, shared by the contiguous KV cache,
the uncached forward and the cloud engine's paged pool.

Shapes: B batch, H heads, K kv heads, T queries, S keys, D head dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def attend(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, k_valid: Tensor | None = None) -> Tensor:
    """q (B, H, T, D), k/v (B, K, S, D), q_pos (B, T), k_pos (B, S) -> (B, H, T, D).

    A query sees the keys at positions <= its own (and, when given, only keys with k_valid (B, S) true).
    """
    mask = k_pos[:, None, None, :] <= q_pos[:, None, :, None]  # (B, 1, T, S)
    if k_valid is not None:
        mask = mask & k_valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
