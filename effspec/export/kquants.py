"""GGML's K-quant formats Q4_K and Q6_K, encoded here (gguf-py decodes them but cannot write them).

A K-quant row is cut into super-blocks of 256 weights, each holding sub-blocks
whose own scales are themselves small integers times one float16 per
super-block -- the "double quantization" that brings 4-bit weights to 4.5 bits
a weight and 6-bit ones to 6.5625 (ggml-common.h, `block_q4_K` / `block_q6_K`):

    Q4_K: 8 sub-blocks of 32,  w = d * sc[j] * q - dmin * m[j],  q in [0, 16),
          sc, m in [0, 64) (6 bits each, packed into 12 bytes),   144 bytes
    Q6_K: 16 sub-blocks of 16, w = d * sc[j] * (q - 32),          q in [0, 64),
          sc an int8,                                              210 bytes

Encoding, per super-block:
1. each sub-block gets a float scale (and, for Q4_K, a minimum <= 0, since
   `- dmin * m` cannot add): the range fit Q4_1 and Q4_0 use (min/max; for Q6_K
   the signed peak on the grid's long end, effspec.quant's rule), then two
   rounds of least squares for the line through the rounded codes, kept only
   where they lower the sub-block's squared error;
2. those scales are put on the super-block's integer grid: d = max scale / 63
   (Q6_K: max |scale| / 127), rounded to float16 first, sc = round(scale / d);
3. the codes are rounded against the integer-grid scales actually stored, so
   the decoder's output is exactly what was fitted.

A row length that is not a multiple of 256 has no K-quant form; `quantize`
raises ValueError and the caller falls back (llama.cpp's quantizer uses Q5_0
for Q4_K and Q8_0 for Q6_K there). Weights that lie on a K-quant grid come back
exactly (tested, with gguf-py as the decoder).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

QK_K = 256  # weights per super-block
FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}  # for rows that are not whole super-blocks, as llama.cpp's quantizer does


def _round(x: np.ndarray) -> np.ndarray:
    return np.rint(x)  # half to even, as torch.round


def _fit_affine(x: np.ndarray, scale: np.ndarray, minimum: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Refine per-row (scale, minimum <= 0) of w = scale * q + minimum for rows of x by least squares on the codes."""
    def err(s, m):
        q = np.clip(_round((x - m[:, None]) / np.where(s > 0, s, 1)[:, None]), 0, qmax)
        return ((s[:, None] * q + m[:, None] - x) ** 2).sum(1), q

    n = x.shape[1]
    best_e, q = err(scale, minimum)
    for _ in range(2):
        sq, sx, sqq, sqx = q.sum(1), x.sum(1), (q * q).sum(1), (q * x).sum(1)
        det = n * sqq - sq * sq
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(det > 0, (n * sqx - sq * sx) / det, scale)
            m = np.where(det > 0, (sx - s * sq) / n, minimum)
            # the minimum must stay <= 0: with it pinned at 0, the least-squares scale is sum(qx) / sum(qq)
            pinned = m > 0
            s = np.where(pinned, np.where(sqq > 0, sqx / np.where(sqq > 0, sqq, 1), scale), s)
            m = np.where(pinned, 0.0, m)
        s = np.maximum(s, 0)
        e, q_new = err(s, m)
        better = e < best_e
        scale, minimum = np.where(better, s, scale), np.where(better, m, minimum)
        best_e = np.minimum(e, best_e)
        q = np.where(better[:, None], q_new, q)
    return scale, minimum


def _fit_symmetric(x: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Per-row scale of w = scale * q, q in [qmin, qmax]: the signed peak on qmin, then least squares on the codes."""
    peak = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)[:, 0]
    scale = peak / qmin

    def err(s):
        q = np.clip(_round(x / np.where(s != 0, s, 1)[:, None]), qmin, qmax)
        return ((s[:, None] * q - x) ** 2).sum(1), q

    best_e, q = err(scale)
    for _ in range(2):
        qq = (q * q).sum(1)
        s = np.where(qq > 0, (q * x).sum(1) / np.where(qq > 0, qq, 1), scale)
        e, q_new = err(s)
        better = e < best_e
        scale, best_e, q = np.where(better, s, scale), np.minimum(e, best_e), np.where(better[:, None], q_new, q)
    return scale


def _super_scale(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(d float16 per super-block, integer multipliers) with values ~ d * multiplier, |multiplier| <= top."""
    peak = np.abs(values).max(1)
    d = (peak / top).astype(np.float16)
    df = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        mult = np.where(df[:, None] > 0, _round(values / df[:, None]), 0)
    return d, mult


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """(n, k) float32 with k % 256 == 0 -> (n, k / 256 * 144) uint8 Q4_K blocks."""
    n, k = rows.shape
    x = rows.astype(np.float32).reshape(-1, 8, 32)  # (super-blocks, sub-blocks, weights)
    sub = x.reshape(-1, 32)
    lo, hi = np.minimum(sub.min(1), 0), sub.max(1)
    scale, minimum = _fit_affine(sub, (hi - lo) / 15, lo, 15)
    d, sc = _super_scale(scale.reshape(-1, 8), 63)
    dmin, mn = _super_scale(-minimum.reshape(-1, 8), 63)
    sc, mn = np.clip(sc, 0, 63).astype(np.uint8), np.clip(mn, 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc  # what the decoder multiplies by
    offset = dmin.astype(np.float32)[:, None] * mn
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] > 0, _round((x + offset[..., None]) / step[..., None]), 0)
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(-1, 4, 2, 32)  # 64-weight chunks: 32 low nibbles, 32 high
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    packed = np.concatenate([  # 8 six-bit scales and 8 six-bit minimums in 12 bytes
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
        mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4),
    ], 1).astype(np.uint8)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], 1)
    return blocks.reshape(n, -1)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """(n, k) float32 with k % 256 == 0 -> (n, k / 256 * 210) uint8 Q6_K blocks."""
    n, k = rows.shape
    x = rows.astype(np.float32).reshape(-1, 16, 16)
    scale = _fit_symmetric(x.reshape(-1, 16), -32, 31)
    d, sc = _super_scale(scale.reshape(-1, 16), 127)
    sc = np.clip(sc, -128, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] != 0, _round(x / step[..., None]), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(-1, QK_K)
    halves = q.reshape(-1, 2, 128)
    low = halves & 0xF  # two 64-weight runs share a byte of ql: the first in its low nibble
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)
    high = (halves >> 4).reshape(-1, 2, 4, 32)  # four 32-weight runs share a byte of qh, two bits each
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], 1)
    return blocks.reshape(n, -1)


ENCODERS = {T.Q4_K: quantize_q4_k, T.Q6_K: quantize_q6_k}


def quantize(arr: np.ndarray, qtype: T) -> np.ndarray:
    """A 2-D float array in `qtype` (Q4_K or Q6_K); ValueError when its rows are not whole super-blocks."""
    if arr.ndim != 2 or arr.shape[-1] % QK_K:
        raise ValueError(f"rows of {arr.shape[-1]} are not a multiple of {QK_K}")
    return ENCODERS[qtype](arr)
