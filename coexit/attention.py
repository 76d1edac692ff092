"""Masked scaled-dot-product attention over explicit query and key positions, shared by the contiguous KV cache,
the uncached forward and the cloud engine's paged pool; and one decode query per sequence (`attend_one`).

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
    if q.shape[2] == 1:  # as attend_one attends (the same values as its unmasked decode step)
        return attend_one(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """One query per sequence: q (B, H, 1, D) over k/v (B, K, S, D), under mask (B, 1, 1, S) (None: every key is
    visible) -> (B, H, 1, D).

    On a CPU, each KV head's G = H / K query heads go through SDPA as G query rows of that head (q (B, K, G, D)):
    one pass over its keys instead of G, about a quarter faster than SDPA's own grouped-query path at decode
    shapes. Query head h reads KV head h // G either way, so the results agree to rounding.
    """
    b, h, _, d = q.shape
    kv = k.shape[1]
    if h == kv or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=h != kv)
    return F.scaled_dot_product_attention(q.reshape(b, kv, h // kv, d), k, v, attn_mask=mask).view(b, h, 1, d)
