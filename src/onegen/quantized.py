"""int8 arithmetic for the `flat-int8` backend: per-row symmetric codes and an int8 matrix product.

Guarantees: `quantize_int8` is deterministic (the same rows give the same codes, so codes can be
re-made from saved vectors instead of stored), and `codes * scales` is within half a step of the
rows (scale = the row's largest magnitude / 127); `int8_dot` accumulates in int32 on torch's int8
kernels (CPU, CUDA), and is a float product cast to int32 on other devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: codes (N, D) int8 and scales (N,) float32 with rows ~ codes * scales."""
    scales = rows.float().abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    codes = torch.round(rows.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def int8_dot(q8: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(Q, D) int8 @ (C, D).T int8 -> (Q, C) int32, on the int8 matmul kernels where torch has them.

    CUDA's kernel wants more than 16 query rows and sizes in multiples of 8: rows are padded with zeros
    (a zero code contributes nothing) and the padding is cut off again.
    """
    if q8.device.type not in ("cpu", "cuda"):
        return (q8.float() @ codes.float().T).to(torch.int32)
    if q8.device.type == "cpu":
        return torch._int_mm(q8, codes.T)
    q_pad = max(32, -(-q8.shape[0] // 8) * 8) - q8.shape[0]
    c_pad = -codes.shape[0] % 8
    if q_pad:
        q8 = F.pad(q8, (0, 0, 0, q_pad))
    if c_pad:  # only a ragged last chunk: padding copies, and the scan is bandwidth-bound
        codes = F.pad(codes, (0, 0, 0, c_pad))
    return torch._int_mm(q8, codes.T)[: q8.shape[0] - q_pad, : codes.shape[0] - c_pad]

