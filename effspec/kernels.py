"""Decode-time matrix-vector kernels for packed 4-bit and 8-bit weights, compiled on first use.

Batch-1 decode is bandwidth-bound in principle: each token reads every weight
once, and 4-bit codes are 8x fewer bytes than float32. torch's own low-bit CPU
kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) are only fast
with bfloat16 activations on CPUs with AVX512-BF16; on AVX2-only CPUs they are
slower than a float32 matmul (measured here: 1536x576, one token, int4pack
778 us against float32 425 us). These kernels read `QuantLinear`'s own packed
bytes directly -- no second copy of the weights. Per output n and group g,

    y[r, n] = sum_g  scale[n, g] * (codes . x)_g  +  minimum[n, g] * (sum_{k in g} x[r, k])

Two ways to form (codes . x):

- int8 activations (default; llama.cpp's Q8 x Q4 scheme): each row of x is
  rounded to int8 per block of 32 columns with scale max|x| / 127, and codes
  meet it in `_mm256_maddubs_epi16` integer dot products, 64 multiply-adds in
  about ten instructions. Outputs differ from the exact ones by ~1% of their
  range (the minimum term keeps float sums). Measured on this machine (AMD
  EPYC, AVX2, 1 thread), 1536x576 g64, weights not in cache: 112 us against
  358 us for float32 `F.linear`.
- float activations (`EFFSPEC_KERNEL_ACTIVATIONS=float`, or widths that are
  not whole 64-column chunks): codes widened to float32 and FMA'd, exact up
  to summation order, ~2.5x slower than the int8 form.

Rows of W are split across threads with `at::parallel_for`. The extension is
built once per machine with torch's `cpp_extension` (g++ and ninja; ~1 minute)
into torch's extension cache. When no compiler is present, or
`EFFSPEC_CPP_KERNELS=0`, `available()` is False and `QuantLinear` uses its
other paths.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from effspec.cpp import compile_inline


_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cmath>
#include <vector>
#include <algorithm>
#include <memory>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum(__m256 v) {
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}
#endif

// One output: sum over groups g of S[g] * (codes . x)_g + Z[g] * XS[g]. `codes` are nibbles (two a
// byte: even column low, odd column high; xe/xo the even/odd columns of x) or bytes (x whole).
template <bool NIBBLES>
static inline float row_dot(const uint8_t* row, const float* xe, const float* xo, const float* S,
                            const float* Z, const float* XS, int64_t G, int64_t group) {
  const int64_t per = NIBBLES ? group / 2 : group;  // bytes per group
  float acc_s = 0.f;
  for (int64_t g = 0; g < G; ++g) acc_s += Z[g] * XS[g];
#if defined(__AVX2__) && defined(__FMA__)
  if (per % 16 == 0) {
    // two 8-code steps an iteration into separate accumulators (named, so they stay in registers):
    // a single FMA chain would wait on FMA latency
    __m256 acc = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi32(15);
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* b = row + g * per;
      const float* e = xe + g * per;
      __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps(), d2 = _mm256_setzero_ps(), d3 = _mm256_setzero_ps();
      for (int64_t j = 0; j < per; j += 16) {
        __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(b + j)));
        __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(b + j + 8)));
        if (NIBBLES) {
          const float* o = xo + g * per;
          d0 = _mm256_fmadd_ps(_mm256_loadu_ps(e + j), _mm256_cvtepi32_ps(_mm256_and_si256(v0, mask)), d0);
          d1 = _mm256_fmadd_ps(_mm256_loadu_ps(e + j + 8), _mm256_cvtepi32_ps(_mm256_and_si256(v1, mask)), d1);
          d2 = _mm256_fmadd_ps(_mm256_loadu_ps(o + j), _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), d2);
          d3 = _mm256_fmadd_ps(_mm256_loadu_ps(o + j + 8), _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), d3);
        } else {
          d0 = _mm256_fmadd_ps(_mm256_loadu_ps(e + j), _mm256_cvtepi32_ps(v0), d0);
          d1 = _mm256_fmadd_ps(_mm256_loadu_ps(e + j + 8), _mm256_cvtepi32_ps(v1), d1);
        }
      }
      const __m256 dot = _mm256_add_ps(_mm256_add_ps(d0, d1), _mm256_add_ps(d2, d3));
      acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(S[g]), acc);
    }
    return hsum(acc) + acc_s;
  }
#endif
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* b = row + g * per;
    float dot = 0.f;
    for (int64_t j = 0; j < per; ++j)
      dot += NIBBLES ? xe[g * per + j] * (float)(b[j] & 15) + xo[g * per + j] * (float)(b[j] >> 4)
                     : xe[g * per + j] * (float)b[j];
    acc_s += S[g] * dot;
  }
  return acc_s;
}

// ---- int8 activations (llama.cpp's Q8 x Q4 scheme) ------------------------------------------------
// x is rounded to int8 per block of 32 columns, d = max|x| / 127, so a block's dot product with the
// codes is an integer one: _mm256_maddubs_epi16 multiplies 32 unsigned codes by 32 signed int8 values
// into 16-bit pair sums (4-bit: 15 * 127 * 2 fits; 8-bit codes go through sign tricks, below), 64
// multiply-adds in ~6 instructions against ~24 for the float path above.
//
// Scratch for one call's quantized rows. For 4-bit codes each 64-column chunk is stored as its 32 even
// columns then its 32 odd ones, the order of a chunk's 32 weight bytes' low and high nibbles.
struct QuantizedRows {
  std::vector<int8_t> q;   // (M, K)
  std::vector<float> d;    // (M, K/32)
  std::vector<float> dv;   // (M, U, 8): the x scale of each lane of a unit's 8 int32 sums (see lowbit_dot_i8)
  std::vector<float> xs;   // (M, G) float sums of x per weight group, for the minimum term
};

static void quantize_rows(const float* X, int64_t M, int64_t K, int64_t group, bool split, QuantizedRows& out) {
  const int64_t B = K / 32, G = K / group;
  out.q.resize(M * K); out.d.resize(M * B); out.xs.resize(M * G); out.dv.resize(M * B * 8);
  for (int64_t r = 0; r < M; ++r) {
    const float* x = X + r * K;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < group; ++k) s += x[g * group + k];
      out.xs[r * G + g] = s;
    }
    for (int64_t b = 0; b < B; ++b) {
      float amax = 0.f;
      for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(x[b * 32 + k]));
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      out.d[r * B + b] = d;
      // a 4-bit unit (64 columns) holds two blocks in lanes 0-3 and 4-7; an 8-bit unit is one block
      float* dv = split ? out.dv.data() + r * B * 8 + (b / 2) * 8 + (b % 2) * 4 : out.dv.data() + (r * B + b) * 8;
      for (int k = 0; k < (split ? 4 : 8); ++k) dv[k] = d;
      for (int k = 0; k < 32; ++k) {
        const int8_t v = (int8_t)std::nearbyint(x[b * 32 + k] * inv);
        int64_t pos = b * 32 + k;
        if (split) {  // column c of its 64-chunk goes to slot c/2 (even) or 32 + c/2 (odd)
          const int64_t c = (b % 2) * 32 + k;
          pos = (b / 2) * 64 + (c % 2) * 32 + c / 2;
        }
        out.q[r * K + pos] = v;
      }
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// 64 4-bit codes (32 bytes) against their chunk's int8 x (32 even columns, then 32 odd): 8 int32 sums,
// lanes 0-3 from the chunk's first block of 32 columns, lanes 4-7 from its second.
static inline __m256 q4_chunk(const uint8_t* w, const int8_t* xq) {
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i v = _mm256_loadu_si256((const __m256i*)w);
  const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xq)),
                                     _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xq + 32))));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
}

// 32 8-bit codes against one block of int8 x. A code q stands for (q - 128) * s + (min + 128 s): q ^ 0x80
// is q - 128 as int8, and |q - 128| (<= 128) times sign-adjusted x keeps pair sums within int16
// (128 * 127 * 2 < 32768).
static inline __m256 q8_block(const uint8_t* w, const int8_t* xq) {
  const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)w), flip);
  const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(v), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)xq), v));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
}

// One output row against one int8 row: sum over units (64 columns for 4-bit codes, 32 for 8-bit) of
// int dot * x scale (dv, 8 lanes a unit) * weight scale. MODE 0: 4-bit, groups a multiple of 64, unit u
// in group ug[u]; 1: 4-bit, groups of 32 (two a unit); 2: 8-bit, unit u in group ug[u].
template <int MODE>
static inline __m256 unit_term(const uint8_t* w, const int8_t* xq, const float* dv, const float* S,
                               const int32_t* ug, int64_t u) {
  const __m256 dot = MODE == 2 ? q8_block(w + u * 32, xq + u * 32) : q4_chunk(w + u * 32, xq + u * 64);
  const __m256 s = MODE == 1 ? _mm256_set_m128(_mm_set1_ps(S[2 * u + 1]), _mm_set1_ps(S[2 * u]))
                             : _mm256_set1_ps(S[ug[u]]);
  return _mm256_mul_ps(_mm256_mul_ps(dot, _mm256_loadu_ps(dv + u * 8)), s);
}

template <int MODE>
static inline float lowbit_dot_i8(const uint8_t* w, const int8_t* xq, const float* dv, const float* S,
                                  const int32_t* ug, int64_t U) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t u = 0;
  for (; u + 1 < U; u += 2) {
    acc0 = _mm256_add_ps(acc0, unit_term<MODE>(w, xq, dv, S, ug, u));
    acc1 = _mm256_add_ps(acc1, unit_term<MODE>(w, xq, dv, S, ug, u + 1));
  }
  if (u < U) acc0 = _mm256_add_ps(acc0, unit_term<MODE>(w, xq, dv, S, ug, u));
  return hsum(_mm256_add_ps(acc0, acc1));
}
#endif

// y = x W_hat^T (+ bias) for x (..., K) float32 and an (N, K) weight of `bits`-bit codes (4: two a byte,
// column 2j in the low nibble of byte j; 8: one a byte) with per-group scale and minimum (N, K/group)
// float32. int8_act: x rounded to int8 per 32 columns (needs AVX2, K % 64 == 0 for 4 bits), else float.
torch::Tensor lowbit_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum,
                            torch::Tensor bias, int64_t N, int64_t K, int64_t group, int64_t bits, bool int8_act) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.size(-1) == K, "x: contiguous float32 (..., K)");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const bool nibbles = bits == 4;
  const int64_t M = x.numel() / K, G = K / group, row_bytes = nibbles ? K / 2 : K;
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  auto y = torch::empty(out_shape, x.options());
  const float* X = x.data_ptr<float>();
  const uint8_t* P = codes.data_ptr<uint8_t>();
  const float* S = scale.data_ptr<float>();
  const float* Z = minimum.data_ptr<float>();
  const float* BIAS = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
#if defined(__AVX2__) && defined(__FMA__)
  if (int8_act && K % (nibbles ? 64 : 32) == 0 && group % 32 == 0 && (group == 32 || group % 64 == 0 || !nibbles)) {
    static thread_local QuantizedRows scratch;
    QuantizedRows& qr = scratch;  // the calling thread's: parallel_for's workers must not see their own
    quantize_rows(X, M, K, group, nibbles, qr);
    const int64_t B = K / 32, U = nibbles ? K / 64 : B, mode = !nibbles ? 2 : group == 32 ? 1 : 0;
    std::vector<int32_t> ug(U);  // each unit's weight group
    for (int64_t u = 0; u < U; ++u) ug[u] = (int32_t)(u * (nibbles ? 64 : 32) / group);
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* w = P + n * row_bytes;
        const float *s = S + n * G, *z = Z + n * G;
        for (int64_t r = 0; r < M; ++r) {
          float acc = BIAS ? BIAS[n] : 0.f;
          const float* xs = qr.xs.data() + r * G;
          for (int64_t g = 0; g < G; ++g) acc += (nibbles ? z[g] : z[g] + 128.f * s[g]) * xs[g];
          const int8_t* xq = qr.q.data() + r * K;
          const float* dv = qr.dv.data() + r * B * 8;
          acc += mode == 0 ? lowbit_dot_i8<0>(w, xq, dv, s, ug.data(), U)
               : mode == 1 ? lowbit_dot_i8<1>(w, xq, dv, s, ug.data(), U)
                           : lowbit_dot_i8<2>(w, xq, dv, s, ug.data(), U);
          Y[r * N + n] = acc;
        }
      }
    });
    return y;
  }
#endif
  // float activations: per-group sums of x for the minimum term and, for nibbles, x split into even and
  // odd columns so a byte's two codes meet contiguous x
  std::vector<float> xs(M * G), xe(nibbles ? M * K / 2 : 0), xo(nibbles ? M * K / 2 : 0);
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < group; ++k) s += X[r * K + g * group + k];
      xs[r * G + g] = s;
    }
    if (nibbles)
      for (int64_t j = 0; j < K / 2; ++j) {
        xe[r * K / 2 + j] = X[r * K + 2 * j];
        xo[r * K / 2 + j] = X[r * K + 2 * j + 1];
      }
  }
  const float *XE = nibbles ? xe.data() : X, *XO = nibbles ? xo.data() : X;
  const int64_t x_stride = nibbles ? K / 2 : K;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t r = 0; r < M; ++r) {
        const float v = nibbles
            ? row_dot<true>(P + n * row_bytes, XE + r * x_stride, XO + r * x_stride, S + n * G, Z + n * G, xs.data() + r * G, G, group)
            : row_dot<false>(P + n * row_bytes, XE + r * x_stride, XO + r * x_stride, S + n * G, Z + n * G, xs.data() + r * G, G, group);
        Y[r * N + n] = v + (BIAS ? BIAS[n] : 0.f);
      }
  });
  return y;
}

// ---- the rest of a decode step (effspec.decoder): one call where eager torch takes five to ten ops --
// RMSNorm of each row of x (T, D): x * rsqrt(mean(x^2) + eps) * w.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && w.scalar_type() == torch::kFloat, "float32");
  const int64_t D = x.size(-1), T = x.numel() / D;
  auto y = torch::empty_like(x);
  const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) ss += X[t * D + i] * X[t * D + i];
    const float r = 1.f / std::sqrt(ss / D + (float)eps);
    for (int64_t i = 0; i < D; ++i) Y[t * D + i] = X[t * D + i] * r * W[i];
  }
  return y;
}

// silu(g) * u, elementwise.
torch::Tensor silu_mul(torch::Tensor g, torch::Tensor u) {
  TORCH_CHECK(g.scalar_type() == torch::kFloat && g.is_contiguous() && u.is_contiguous() && g.numel() == u.numel(), "float32");
  auto y = torch::empty_like(g);
  const float *G = g.data_ptr<float>(), *U = u.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for (int64_t i = 0; i < g.numel(); ++i) Y[i] = G[i] / (1.f + std::exp(-G[i])) * U[i];
  return y;
}

// Softmax of one query's scores p[0..n) in place, divided by their sum. Never inlined, so every query runs
// this same code: a query's weights then do not depend on how many queries shared its pass (a verify step's
// row equals the decode step of that token).
// Tree verify: keys start..last of the new rows that query's bitmask `see` leaves out (bit r: new row r, whose
// key sits at start + r) score -1e30 before the softmax -- exp underflows to exactly 0 -- and weigh 0 after,
// so a tree row's output equals the decode step of its token after its own ancestors alone.
static inline void hide(float* p, int64_t start, int64_t last, int64_t see, float value) {
  for (int64_t j = start; j <= last; ++j)
    if (!((see >> (j - start)) & 1)) p[j] = value;
}

__attribute__((noinline)) static void softmax_row(float* p, int64_t n) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, p[j]);
  float z = 0.f;
  for (int64_t j = 0; j < n; ++j) z += (p[j] = std::exp(p[j] - m));
  const float r = 1.f / z;
  for (int64_t j = 0; j < n; ++j) p[j] *= r;
}

// One query's scores p[0..n) into its weights: the keys its tree bitmask hides out, softmax over keys 0..last, and
// keys after last weighing 0.
static void weigh(float* p, int64_t start, int64_t last, int64_t see, int64_t n) {
  if (see != -1) hide(p, start, last, see, -1e30f);
  softmax_row(p, last + 1);
  if (see != -1) hide(p, start, last, see, 0.f);
  std::fill(p + last + 1, p + n, 0.f);
}

constexpr int64_t SWEEP = 3;  // queries that share one sweep over a head's keys and values (NQ below)

// One key/value head against NQ (<= SWEEP) of its queries -- query heads of the group, at one or more new
// positions: each key row and value row is read once for all of them instead of once per query. Scores:
// per key, each query's dot product in two interleaved FMA chains (one chain was bound by FMA latency;
// holding the key's 64 columns in registers for all queries measured no faster).
// Weighted values: 16 output columns of every query in registers per pass over a block of 64 value rows
// (16 KB, so the block's four passes after the first read it from L1; accumulating in memory was bound by
// store-to-load forwarding). Per query the arithmetic is the same whatever NQ is --
// explicit intrinsics, compiled without fast-math -- so a verify row equals the decode step of its token.
// P (NQ, stride) holds the scores, then the weights; query c sees keys 0..last[c], later keys weigh 0.
// outs start at zero (rope_attend's output is allocated zeroed) and accumulate block by block.
#if defined(__AVX2__) && defined(__FMA__)
template <int NQ>
__attribute__((noinline, optimize("no-fast-math")))
static void attend_group(const float* const* qs, const float* K, const float* V, const int64_t* last, const int64_t* see,
                         int64_t start, int64_t n, int64_t d, float scale, float* P, int64_t stride, float* const* outs) {
  for (int64_t j = 0; j < n; ++j) {
    const float* k = K + j * d;
    for (int c = 0; c < NQ; ++c) {
      const float* q = qs[c];
      __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
      __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(q + 8), _mm256_loadu_ps(k + 8));
      for (int64_t i = 16; i < d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(k + i + 8), a1);
      }
      a0 = _mm256_add_ps(a0, a1);  // then the 8 lanes summed, in one fixed order
      __m128 x = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
      x = _mm_add_ps(x, _mm_movehl_ps(x, x));
      P[c * stride + j] = _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x))) * scale;
    }
  }
  for (int c = 0; c < NQ; ++c) weigh(P + c * stride, start, last[c], see[c], n);
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t j1 = std::min<int64_t>(n, j0 + 64);
    for (int64_t i = 0; i < d; i += 16) {
      __m256 o[NQ][2];
      for (int c = 0; c < NQ; ++c) o[c][0] = _mm256_loadu_ps(outs[c] + i), o[c][1] = _mm256_loadu_ps(outs[c] + i + 8);
      for (int64_t j = j0; j < j1; ++j) {
        const __m256 v0 = _mm256_loadu_ps(V + j * d + i), v1 = _mm256_loadu_ps(V + j * d + i + 8);
        for (int c = 0; c < NQ; ++c) {
          const __m256 w = _mm256_broadcast_ss(P + c * stride + j);
          o[c][0] = _mm256_fmadd_ps(w, v0, o[c][0]);
          o[c][1] = _mm256_fmadd_ps(w, v1, o[c][1]);
        }
      }
      for (int c = 0; c < NQ; ++c) _mm256_storeu_ps(outs[c] + i, o[c][0]), _mm256_storeu_ps(outs[c] + i + 8, o[c][1]);
    }
  }
}

#if defined(__AVX512F__)
// The same rule with 512-bit registers, a third of the instructions per query and key. Scores: 16 keys at a
// time, each key's d columns in one 16-lane accumulator, then the 16 accumulators summed lane-wise in one tree of
// shuffles (lanes l and l + 8, then 128-bit lanes, then pairs, then neighbours) that leaves key 4e + i in lane
// 4i + e, put back in order by one permute -- where the 256-bit form summed every key's lanes on its own. A last
// partial block reads its keys from a zero-padded copy, so a key's score is the same arithmetic wherever the
// block boundary falls (a verify step sees more keys than the decode step of its first row). Weighted values:
// 64 output columns of every query in registers for one sweep over the value rows, each value row loaded once into
// registers for all the queries. The head size d is a template constant (64 or 128; other sizes take the 256-bit
// form), so the 16 key rows are fixed offsets from one pointer (with d a variable their 16 pointers spilled), and
// sum16 is inlined (called out of line, its 16 accumulators went through memory). Those three changes, same
// arithmetic: smollm2's attention at a 1,100-token context, 1 thread, 52 -> 37 us a layer for one row, 370 -> 251
// us for 8 rows; a whole 8-row verify 47.0 -> 43.0 ms.
__attribute__((always_inline, optimize("no-fast-math"))) static inline __m512 sum16(const __m512* a) {
  __m512 z[8], w[4], u[2];
#pragma GCC unroll 8
  for (int m = 0; m < 8; ++m)
    z[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0x44), _mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0xEE));
  for (int m = 0; m < 4; ++m)
    w[m] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * m], z[2 * m + 1], 0x88), _mm512_shuffle_f32x4(z[2 * m], z[2 * m + 1], 0xDD));
  for (int m = 0; m < 2; ++m)
    u[m] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * m], w[2 * m + 1], 0x44), _mm512_shuffle_ps(w[2 * m], w[2 * m + 1], 0xEE));
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, s);
}

template <int NQ, int d>
__attribute__((noinline, optimize("no-fast-math")))
static void attend_group512(const float* const* qs, const float* K, const float* V, const int64_t* last, const int64_t* see,
                            int64_t start, int64_t n, float scale, float* P, int64_t stride, float* const* outs) {
  alignas(64) float pad[16 * d];
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const float* kb = K + j0 * d;
    if (j0 + 16 > n) {  // the last, partial block: its keys then zeros
      std::fill(pad, pad + 16 * d, 0.f);
      std::copy(kb, kb + (n - j0) * d, pad);
      kb = pad;
    }
    for (int c = 0; c < NQ; ++c) {
      const float* q = qs[c];
      __m512 a[16];
      const __m512 q0 = _mm512_loadu_ps(q);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) a[j] = _mm512_mul_ps(q0, _mm512_loadu_ps(kb + j * d));
      for (int64_t i = 16; i < d; i += 16) {
        const __m512 qv = _mm512_loadu_ps(q + i);
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) a[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kb + j * d + i), a[j]);
      }
      _mm512_store_ps(P + c * stride + j0, _mm512_mul_ps(sum16(a), sc));
    }
  }
  for (int c = 0; c < NQ; ++c) weigh(P + c * stride, start, last[c], see[c], n);
  for (int64_t i0 = 0; i0 < d; i0 += 64) {
    __m512 o[NQ][4];
#pragma GCC unroll 4
    for (int c = 0; c < NQ; ++c)
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) o[c][v] = _mm512_loadu_ps(outs[c] + i0 + 16 * v);
    for (int64_t j = 0; j < n; ++j) {
      __m512 vv[4];
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        vv[v] = _mm512_loadu_ps(V + j * d + i0 + 16 * v);
        asm volatile("" : "+v"(vv[v]));  // held in a register for all NQ queries, not re-loaded by each FMA
      }
#pragma GCC unroll 4
      for (int c = 0; c < NQ; ++c) {
        const __m512 w = _mm512_set1_ps(P[c * stride + j]);
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) o[c][v] = _mm512_fmadd_ps(w, vv[v], o[c][v]);
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < NQ; ++c)
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) _mm512_storeu_ps(outs[c] + i0 + 16 * v, o[c][v]);
  }
}
#endif

// One sweep over the keys and values of a head for nq <= SWEEP queries (the registers hold that many).
static void attend_queries(const float* const* qs, const float* K, const float* V, const int64_t* last,
                           const int64_t* see, int64_t start, int64_t nq, int64_t n, int64_t d, float scale, float* P,
                           int64_t stride, float* const* outs) {
#if defined(__AVX512F__)
  if (d == 64 || d == 128) {  // the head size a compile-time constant: the 16 key rows' addresses are offsets
    auto f = d == 64 ? (nq == 1 ? attend_group512<1, 64> : nq == 2 ? attend_group512<2, 64> : attend_group512<3, 64>)
                     : (nq == 1 ? attend_group512<1, 128> : nq == 2 ? attend_group512<2, 128> : attend_group512<3, 128>);
    f(qs, K, V, last, see, start, n, scale, P, stride, outs);
    return;
  }
#endif
  switch (nq) {
    case 1: attend_group<1>(qs, K, V, last, see, start, n, d, scale, P, stride, outs); break;
    case 2: attend_group<2>(qs, K, V, last, see, start, n, d, scale, P, stride, outs); break;
    default: attend_group<3>(qs, K, V, last, see, start, n, d, scale, P, stride, outs); break;
  }
}
#endif

// The portable form: one query at a time, the same rule (scores, softmax_row, weighted sum of values).
static void attend_one(const float* q, const float* K, const float* V, int64_t n, int64_t see, int64_t start,
                       int64_t d, float scale, float* p, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    float s = 0.f;
    for (int64_t i = 0; i < d; ++i) s += q[i] * K[j * d + i];
    p[j] = s * scale;
  }
  weigh(p, start, n - 1, see, n);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < d; ++i) out[i] += p[j] * V[j * d + i];
}

// T new positions start..start+T-1 (a decode step, or a short speculative verify): RoPE (transformers'
// half-split form) on q (T, H*d) and k (T, KV*d) with table rows cos/sin (T, d); k and v written into
// the block's caches (KV, max_len, d); then query t of every head attends causally over positions
// 0..start+t of its key/value head (GQA: H/KV query heads share one). Returns (T, H*d). A key/value head
// and up to SWEEP of its queries make one task for the threads. A tree verify passes `see` (T,) int64: bit r of
// see[t] says whether row t sees new row r (its ancestors and itself, all before it); empty: causal.
torch::Tensor rope_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                          torch::Tensor kcache, torch::Tensor vcache, int64_t start, double scale, torch::Tensor see) {
  const int64_t d = cos.size(-1), T = cos.numel() / d, H = q.numel() / (T * d), KV = k.numel() / (T * d);
  const int64_t L = kcache.size(1), half = d / 2, G = H / KV, n = start + T;
  TORCH_CHECK(kcache.is_contiguous() && vcache.is_contiguous() && start + T <= L && q.is_contiguous()
              && k.is_contiguous() && v.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "rope_attend: contiguous float32 inputs, positions inside the cache");
  TORCH_CHECK(see.numel() == 0 || (see.numel() == T && see.scalar_type() == torch::kLong && T <= 62),
              "rope_attend: see is empty or (T,) int64 bitmasks");
  const int64_t* SEE = see.numel() ? see.data_ptr<int64_t>() : nullptr;
  const float *Q = q.data_ptr<float>(), *Kn = k.data_ptr<float>(), *Vn = v.data_ptr<float>();
  float *KC = kcache.data_ptr<float>(), *VC = vcache.data_ptr<float>();
  auto rope = [&](const float* x, const float* C, const float* S, float* out) {
    for (int64_t i = 0; i < half; ++i) {
      out[i] = x[i] * C[i] - x[i + half] * S[i];
      out[i + half] = x[i + half] * C[i + half] + x[i] * S[i + half];
    }
  };
  auto o = torch::zeros({T, H * d}, q.options());
  float* O = o.data_ptr<float>();
  std::vector<float> qr(T * H * d);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t pos = start + t;
    const float *C = cos.data_ptr<float>() + t * d, *S = sin.data_ptr<float>() + t * d;
    for (int64_t h = 0; h < KV; ++h) {
      rope(Kn + (t * KV + h) * d, C, S, KC + (h * L + pos) * d);
      std::copy(Vn + (t * KV + h) * d, Vn + (t * KV + h + 1) * d, VC + (h * L + pos) * d);
    }
    for (int64_t h = 0; h < H; ++h) rope(Q + (t * H + h) * d, C, S, qr.data() + (t * H + h) * d);
  }
  const int64_t stride = (n + 15) / 16 * 16;  // every query's score row starts 64-byte aligned alike
  // One task: a key/value head and up to SWEEP of its G * T queries (query c is row c / G's head kv * G + c % G).
  // Splitting the heads alone left a verify unbalanced on 2 threads (smollm2's 3 key/value heads: one thread
  // took two), and a query's arithmetic does not depend on which task runs it.
  const int64_t groups = (G * T + SWEEP - 1) / SWEEP;
  at::parallel_for(0, KV * groups, 1, [&](int64_t a, int64_t b) {
    auto P = torch::empty({SWEEP, stride}, q.options());  // torch's allocations are 64-byte aligned
    const float* qs[SWEEP];
    float* outs[SWEEP];
    int64_t last[SWEEP], seen[SWEEP];
    for (int64_t task = a; task < b; ++task) {
      const int64_t kv = task / groups, c0 = task % groups * SWEEP, nq = std::min<int64_t>(SWEEP, G * T - c0);
      const float *Kh = KC + kv * L * d, *Vh = VC + kv * L * d;
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t t = (c0 + i) / G, h = kv * G + (c0 + i) % G;
        qs[i] = qr.data() + (t * H + h) * d;
        outs[i] = O + (t * H + h) * d;
        last[i] = start + t;
        seen[i] = SEE ? SEE[t] : -1;  // -1: every key up to last
      }
      float* p = P.data_ptr<float>();
#if defined(__AVX2__) && defined(__FMA__)
      if (d % 16 == 0) {
        attend_queries(qs, Kh, Vh, last, seen, start, nq, n, d, (float)scale, p, stride, outs);
        continue;
      }
#endif
      for (int64_t i = 0; i < nq; ++i)
        attend_one(qs[i], Kh, Vh, last[i] + 1, seen[i], start, d, (float)scale, p, outs[i]);
    }
  });
  return o;
}

// y = x W^T (+ b) for a few rows of x (M <= 8; a decode step or a speculative verify): each weight row is read
// once and meets all M rows in registers. BLAS's small-M GEMM packs W per call and runs 2-3x slower than its
// one-row GEMV here (1536x576: 1050 us at M = 5 against 380 us at M = 1).
//
// One output's arithmetic is the same whatever M and the tiling, so a verify row equals its token's decode step
// bitwise: 16-column chunks of w * x accumulate lane-wise in two 8-lane halves (one 512-bit register, or two
// 256-bit ones), then hsum(lo + hi), then the columns past the last whole chunk one by one, then the bias.
//
// At M = 1 the one sequential stream of W is bound by memory and the hardware prefetcher keeps up. At M >= 2 the
// FMAs per byte leave it behind and the multiply stalls on DRAM as often as it computes, so the time was the sum of
// the two (head 49152x576, 1 thread: M = 4 9.3 ms, M = 8 12.6 ms, against 5.2 ms at M = 1). Prefetching the weight
// rows ~48 KB ahead into L2 overlaps them: 4.9 and 7.2 ms. x's rows stay in L1 while M * K floats fit in ~24 KB;
// past that (down_proj's K = 1536 at M >= 5) three weight rows share each load of x. A whole smollm2-135m step at a
// 1,100-token context, 1 thread: 4 rows 54 -> 37 ms, 8 rows 76 -> 52 ms, one row 29 ms either way. Built without
// AVX-512 (-mno-avx512f on this machine) smollm2's linears in order took 22.6 ms at 4 rows and 39.7 at 8, against
// 40.8 and 77.6 for the kernel before, with the same bitwise agreement across row counts.
__attribute__((noinline, optimize("no-fast-math")))
static float finish_row(float s, const float* w, const float* x, int64_t k, int64_t K, const float* b) {
  for (; k < K; ++k) s += w[k] * x[k];
  return b ? s + *b : s;
}

// finish_row's call only where there is a tail or a bias (smollm2's K = 576 and 1536 leave neither), not once per
// output and row.
static inline float finish(float s, const float* w, const float* x, int64_t k, int64_t K, const float* B, int64_t n) {
  return k == K && !B ? s : finish_row(s, w, x, k, K, B ? B + n : nullptr);
}

#if defined(__AVX512F__)
constexpr int FIRST_PREFETCHED = 2;  // the smallest M whose weight tiles are prefetched
#else
constexpr int FIRST_PREFETCHED = 3;
#endif

// Weight rows n .. n+J-1 against the R rows of X, lanes in two 256-bit halves; `ahead`: the weight bytes to
// prefetch while this tile runs.
template <int R, int J>
static inline void rows_block(const float* X, const float* W, const float* B, float* Y, int64_t N, int64_t K,
                              int64_t n, const float* ahead) {
  const float* w = W + n * K;
  float acc[J][R];
  int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 lo[J][R], hi[J][R];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) lo[j][r] = hi[j][r] = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    if (ahead)
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * K + k), _MM_HINT_T1);
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      const __m256 w0 = _mm256_loadu_ps(w + j * K + k), w1 = _mm256_loadu_ps(w + j * K + k + 8);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        lo[j][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + r * K + k), lo[j][r]);
        hi[j][r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + r * K + k + 8), hi[j][r]);
      }
    }
  }
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = hsum(_mm256_add_ps(lo[j][r], hi[j][r]));
#else
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = 0.f;
#endif
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) Y[r * N + n + j] = finish(acc[j][r], w + j * K, X + r * K, k, K, B, n + j);
}

#if defined(__AVX512F__)
// The same arithmetic with the halves as one 512-bit register: half the instructions, and room for 8 rows x 3
// weight rows of accumulators in AVX-512's 32 registers. (At M = 1 the 256-bit form, one stream without prefetches,
// streamed W as fast or faster.)
template <int R, int J>
static inline void rows_block512(const float* X, const float* W, const float* B, float* Y, int64_t N, int64_t K,
                                 int64_t n, const float* ahead) {
  const float* w = W + n * K;
  __m512 a[J][R];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) a[j][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (ahead)
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * K + k), _MM_HINT_T1);
    __m512 wv[J];
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) wv[j] = _mm512_loadu_ps(w + j * K + k);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(X + r * K + k);
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) a[j][r] = _mm512_fmadd_ps(wv[j], xv, a[j][r]);
    }
  }
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) {
      const __m256 lo = _mm512_castps512_ps256(a[j][r]);
      const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[j][r]), 1));
      Y[r * N + n + j] = finish(hsum(_mm256_add_ps(lo, hi)), w + j * K, X + r * K, k, K, B, n + j);
    }
}
#endif

// The M rows in register-sized groups: all M at once with AVX-512's 32 registers, at most 4 at a time with AVX2's
// 16 (a weight tile's later groups read it from L1).
template <int M, int J>
static inline void rows_tile(const float* X, const float* W, const float* B, float* Y, int64_t N, int64_t K,
                             int64_t n, const float* ahead) {
#if defined(__AVX512F__)
  if constexpr (M > 1) {
    rows_block512<M, J>(X, W, B, Y, N, K, n, ahead);
    return;
  }
#endif
  constexpr int R = M < 4 ? M : 4;
  rows_block<R, J>(X, W, B, Y, N, K, n, ahead);
  if constexpr (M > 4) rows_block<M - 4, J>(X + 4 * K, W, B, Y + 4 * N, N, K, n, nullptr);
}

template <int M, int J>
static void rows_pass(const float* X, const float* W, const float* B, float* Y, int64_t N, int64_t K) {
  const int64_t tiles = N / J;
  // prefetch distance in tiles: ~48 KB of W; none for one stream (J = 1) at M = 1 (and M = 2 without AVX-512),
  // where the hardware prefetcher kept up
  const int64_t dist = M < FIRST_PREFETCHED ? 0 : std::max<int64_t>(1, (48 * 1024 / 4 + J * K - 1) / (J * K));
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      rows_tile<M, J>(X, W, B, Y, N, K, t * J, dist && t + dist < t1 ? W + (t + dist) * J * K : nullptr);
  });
  for (int64_t n = tiles * J; n < N; ++n) rows_tile<M, 1>(X, W, B, Y, N, K, n, nullptr);
}

// Weight rows a tile takes (J). With AVX-512, 4 rows run six prefetched weight streams at once, and 2-3 rows are
// run as 4 (`linear_rows` pads them with zero rows). smollm2-135m's linears in situ at a 150-token context, 1 thread,
// against one stream with a `finish_row` call per output: 4 rows 23.4 -> 21.5 ms, one row 20.5-20.8 either way.
// Three streams at 2-3 rows had given 24.3 -> 23.0 and 25.7 -> 23.2 ms; as 4 rows a whole step of 2 rows took
// 1.0-1.4 ms less again (150 and 1,100 tokens, one process alternating), 3 rows 0-0.5 ms less. Without prefetches
// several streams ran ~2x slower than one; at 5-8 rows J > 1 measured worse.
template <int M>
static void rows_linear(const float* X, const float* W, const float* B, float* Y, int64_t N, int64_t K) {
#if defined(__AVX512F__)
  if constexpr (M == 4) {
    rows_pass<4, 6>(X, W, B, Y, N, K);
    return;
  }
#endif
  if (M * K * 4 <= 24 * 1024) rows_pass<M, 1>(X, W, B, Y, N, K);
  else rows_pass<M, 3>(X, W, B, Y, N, K);
}

torch::Tensor linear_rows(torch::Tensor x, torch::Tensor w, torch::Tensor bias) {
  const int64_t K = w.size(1), N = w.size(0), M = x.numel() / K;
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat && x.is_contiguous()
              && w.is_contiguous() && M >= 1 && M <= 8, "linear_rows: contiguous float32, 1..8 rows");
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto y = torch::empty(shape, x.options());
  const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>(), *B = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
#if defined(__AVX512F__)
  if (M == 2 || M == 3) {  // as 4 rows, the last zero
    std::unique_ptr<float[]> Xp(new float[4 * K]()), Yp(new float[4 * N]);
    std::copy(X, X + M * K, Xp.get());
    rows_linear<4>(Xp.get(), W, B, Yp.get(), N, K);
    std::copy(Yp.get(), Yp.get() + M * N, Y);
    return y;
  }
#endif
  switch (M) {
    case 1: rows_linear<1>(X, W, B, Y, N, K); break;
    case 2: rows_linear<2>(X, W, B, Y, N, K); break;
    case 3: rows_linear<3>(X, W, B, Y, N, K); break;
    case 4: rows_linear<4>(X, W, B, Y, N, K); break;
    case 5: rows_linear<5>(X, W, B, Y, N, K); break;
    case 6: rows_linear<6>(X, W, B, Y, N, K); break;
    case 7: rows_linear<7>(X, W, B, Y, N, K); break;
    default: rows_linear<8>(X, W, B, Y, N, K); break;
  }
  return y;
}

// ---- Exact greedy argmax of a float32 head from an int8 screen (effspec.greedy_head) ----------------------
// Q (N, K) int8 and S (N,) with W[n] ~ S[n] Q[n]: screen[r, n] = (Q[n] . x_r) * S[n], one sequential stream of a
// quarter of W's bytes. |screen - linear_rows' exact output| <= C[n] * ||x_r||_1 + 4u |screen| (C built in
// Python from the rounding and summation errors), so only the outputs whose screen lies within both bounds of
// the best lower bound can be the argmax; those few are recomputed by linear_rows' own one-row arithmetic and
// the first of the largest wins, as torch.argmax picks it.
constexpr int64_t SCREEN_AHEAD = 4096;  // bytes of Q prefetched ahead of the tile being read

template <int M, int J>
static inline void screen_tile(const float* X, const int8_t* Q, const float* S, float* Y, int64_t N, int64_t K,
                               int64_t n, bool prefetch) {
  const int8_t* q = Q + n * K;  // the tile's J rows, contiguous
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 a[J][M];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) a[j][r] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(q + SCREEN_AHEAD + k * J), _MM_HINT_T0);
    __m512 wv[J];
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j)
      wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + j * K + k))));
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m512 xv = _mm512_loadu_ps(X + r * K + k);
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) a[j][r] = _mm512_fmadd_ps(wv[j], xv, a[j][r]);
    }
  }
#define SCREEN_SUM(j, r) _mm512_reduce_add_ps(a[j][r])
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 a[J][M];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) a[j][r] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    if (prefetch && k % 16 == 0) _mm_prefetch(reinterpret_cast<const char*>(q + SCREEN_AHEAD + k * J), _MM_HINT_T0);
    __m256 wv[J];
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j)
      wv[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + j * K + k))));
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m256 xv = _mm256_loadu_ps(X + r * K + k);
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) a[j][r] = _mm256_fmadd_ps(wv[j], xv, a[j][r]);
    }
  }
#define SCREEN_SUM(j, r) hsum(a[j][r])
#else
#define SCREEN_SUM(j, r) 0.f
#endif
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      float s = SCREEN_SUM(j, r);
      for (int64_t t = k; t < K; ++t) s += (float)q[j * K + t] * X[r * K + t];
      Y[r * N + n + j] = s * S[n + j];
    }
#undef SCREEN_SUM
}

// Weight rows a tile takes: one prefetched stream of 4 rows at 1-4 query rows (at bandwidth, 28 MB of smollm2's
// head in 1.0 ms at one row), 3 at 5-8 (then the FMAs bound it: 4.5 ms at 8 rows); with AVX2's 16 registers fewer.
template <int M>
static void screen_pass(const float* X, const int8_t* Q, const float* S, float* Y, int64_t N, int64_t K) {
#if defined(__AVX512F__)
  constexpr int J = M <= 4 ? 4 : 3;
#else
  constexpr int J = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
#endif
  const int64_t tiles = N / J;
  at::parallel_for(0, tiles, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      screen_tile<M, J>(X, Q, S, Y, N, K, t * J, (t + 1) * J * K + SCREEN_AHEAD <= t1 * J * K);
  });
  for (int64_t n = tiles * J; n < N; ++n) screen_tile<M, 1>(X, Q, S, Y, N, K, n, false);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SCREEN_VNNI 1
// With AVX512-VNNI the screen multiplies integers: each row of x in two int8 levels, x ~ s_x (x1 + x2 / 254)
// (`quantize_two_level`), stored offset by 128 as the unsigned operand of vpdpbusd, so Q . x1 = Q . (x1 + 128)
// - 128 sum(Q) exactly in int32. 64 multiply-adds an instruction where the float screen widens every code and
// FMAs 16: smollm2's head (1 thread, alternating) at 4 rows 2.10 ms against 2.89, 6 rows 3.39 against 4.19,
// 8 rows 4.61 against 5.69, one row 0.87 against 1.03.
template <int M, int J>
static inline void screen_tile_vnni(const uint8_t* X1, const uint8_t* X2, const float* SX, const int8_t* Q,
                                    const float* S, float* Y, int64_t N, int64_t K, int64_t n, bool prefetch) {
  const int8_t* q = Q + n * K;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i a1[J][M], a2[J][M], qs[J];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) {
    qs[j] = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) a1[j][r] = a2[j][r] = _mm512_setzero_si512();
  }
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    if (prefetch) {
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) _mm_prefetch(reinterpret_cast<const char*>(q + SCREEN_AHEAD + k * J + j * 64), _MM_HINT_T0);
    }
    __m512i qv[J];
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      qv[j] = _mm512_loadu_si512(q + j * K + k);
      qs[j] = _mm512_dpbusd_epi32(qs[j], ones, qv[j]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m512i x1 = _mm512_loadu_si512(X1 + r * K + k), x2 = _mm512_loadu_si512(X2 + r * K + k);
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) {
        a1[j][r] = _mm512_dpbusd_epi32(a1[j][r], x1, qv[j]);
        a2[j][r] = _mm512_dpbusd_epi32(a2[j][r], x2, qv[j]);
      }
    }
  }
  // 254 A1 + A2 lane-wise in int32 (a lane adds at most 4 * 255 * 127 a 64-column step to a1 and to a2, so
  // 255 times that over K / 64 steps stays below 2^31 while K <= 4,096; longer rows take the two sums apart),
  // then one reduction, in int64.
  const __m512i f254 = _mm512_set1_epi32(254);
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) {
    const int64_t sq = _mm512_reduce_add_epi32(qs[j]);
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      int64_t A;  // 254 (Q . x1) + Q . x2
      if (K <= 4096) {
        const __m512i c = _mm512_add_epi32(_mm512_mullo_epi32(a1[j][r], f254), a2[j][r]);
        A = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(c)),
                                                     _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(c, 1))));
      } else {
        A = 254 * (int64_t)_mm512_reduce_add_epi32(a1[j][r]) + (int64_t)_mm512_reduce_add_epi32(a2[j][r]);
      }
      A -= 255 * 128 * sq;
      for (int64_t t = k; t < K; ++t)
        A += (int64_t)q[j * K + t] * (254 * ((int64_t)X1[r * K + t] - 128) + ((int64_t)X2[r * K + t] - 128));
      Y[r * N + n + j] = (float)((double)A / 254.0 * ((double)S[n + j] * (double)SX[r]));
    }
  }
}

template <int M>
static void screen_pass_vnni(const uint8_t* X1, const uint8_t* X2, const float* SX, const int8_t* Q, const float* S,
                             float* Y, int64_t N, int64_t K) {
  constexpr int J = M == 1 ? 4 : (M <= 4 ? 2 : 1);  // 2 J M accumulators + J codes + J sums within 32 registers
  const int64_t tiles = N / J;
  at::parallel_for(0, tiles, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      screen_tile_vnni<M, J>(X1, X2, SX, Q, S, Y, N, K, t * J, (t + 1) * J * K + SCREEN_AHEAD <= t1 * J * K);
  });
  for (int64_t n = tiles * J; n < N; ++n) screen_tile_vnni<M, 1>(X1, X2, SX, Q, S, Y, N, K, n, false);
}
#endif

// x's row as s (x1 + x2 / 254), x1 and x2 integers in [-127, 127] stored + 128; returns sum_k |x_k - that|
// (double), which bounds the screen's extra error by 127 S[n] times it. No fast-math: rounding as written.
__attribute__((noinline, optimize("no-fast-math")))
static double quantize_two_level(const float* x, int64_t K, uint8_t* x1, uint8_t* x2, float* s_out) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  float s = amax / 127.f;
  if (!(s > 0.f)) s = 1.f;
  double dev = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double t = (double)x[k] / s;
    const double a = std::min(127.0, std::max(-127.0, std::nearbyint(t)));
    const double b = std::min(127.0, std::max(-127.0, std::nearbyint((t - a) * 254.0)));
    x1[k] = (uint8_t)(a + 128.0);
    x2[k] = (uint8_t)(b + 128.0);
    dev += std::fabs((double)x[k] - (double)s * (a + b / 254.0));
  }
  *s_out = s;
  return dev;
}

// The outputs of one row that can be its argmax, compared as IEEE floats (no fast-math); false when x or a
// screen is not finite (the caller then takes the float32 logits' argmax).
__attribute__((noinline, optimize("no-fast-math")))
static bool candidates(const float* x, const float* C, const float* S, float extra, const float* y, int64_t N,
                       int64_t K, std::vector<int64_t>& cand) {
  double l1 = 0.0;
  for (int64_t k = 0; k < K; ++k) l1 += std::fabs((double)x[k]);
  if (!std::isfinite(l1)) return false;
  const float L = (float)(l1 * (1.0 + 1e-6)), u4 = 4.f * 5.9604645e-08f;  // 4 * 2^-24
  // b_n = C[n] L + S[n] extra + 4u |y_n| + 1e-30: |screen - exact| <= b_n; the same expression in both passes
  const auto bound = [&](int64_t n) { return C[n] * L + S[n] * extra + u4 * __builtin_fabsf(y[n]) + 1e-30f; };
#if defined(__AVX512F__)
  const __m512 vl = _mm512_set1_ps(L), vu = _mm512_set1_ps(u4), vt = _mm512_set1_ps(1e-30f), ve = _mm512_set1_ps(extra);
  const auto bound16 = [&](int64_t n, __m512 yv) {
    return _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(C + n), vl),
                                                     _mm512_mul_ps(_mm512_loadu_ps(S + n), ve)),
                                       _mm512_mul_ps(vu, _mm512_abs_ps(yv))), vt);
  };
#endif
  float best_low = -INFINITY;
  float nan_if_any = 0.f;  // y * 0 is NaN for an infinite or NaN y
  int64_t n = 0;
#if defined(__AVX512F__)
  __m512 best = _mm512_set1_ps(-INFINITY), bad = _mm512_setzero_ps();
  for (; n + 16 <= N; n += 16) {
    const __m512 yv = _mm512_loadu_ps(y + n);
    best = _mm512_max_ps(best, _mm512_sub_ps(yv, bound16(n, yv)));
    bad = _mm512_add_ps(bad, _mm512_mul_ps(yv, _mm512_setzero_ps()));
  }
  best_low = _mm512_reduce_max_ps(best);
  nan_if_any = _mm512_reduce_add_ps(bad);
#endif
  for (; n < N; ++n) {
    const float low = y[n] - bound(n);
    if (low > best_low) best_low = low;
    nan_if_any += y[n] * 0.f;
  }
  if (!(nan_if_any == 0.f) || !(best_low - best_low == 0.f)) return false;
  n = 0;
#if defined(__AVX512F__)
  const __m512 floor = _mm512_set1_ps(best_low);
  for (; n + 16 <= N; n += 16) {
    const __m512 yv = _mm512_loadu_ps(y + n);
    for (__mmask16 m = _mm512_cmp_ps_mask(_mm512_add_ps(yv, bound16(n, yv)), floor, _CMP_GE_OQ); m; m &= m - 1)
      cand.push_back(n + __builtin_ctz(m));
  }
#endif
  for (; n < N; ++n)
    if (y[n] + bound(n) >= best_low) cand.push_back(n);
  return true;
}

// The first of the largest exact outputs among the candidates (increasing n), as torch.argmax; -1 if one is not
// finite.
__attribute__((noinline, optimize("no-fast-math")))
static int64_t first_max(const float* y, const std::vector<int64_t>& cand) {
  int64_t best = -1;
  for (int64_t n : cand) {
    if (!std::isfinite(y[n])) return -1;
    if (best < 0 || y[n] > y[best]) best = n;
  }
  return best;
}

torch::Tensor screened_argmax(torch::Tensor x, torch::Tensor w, torch::Tensor q, torch::Tensor scale,
                              torch::Tensor coef) {
  const int64_t K = w.size(1), N = w.size(0), M = x.numel() / K;
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat && q.scalar_type() == torch::kChar
              && scale.scalar_type() == torch::kFloat && coef.scalar_type() == torch::kFloat && x.is_contiguous()
              && w.is_contiguous() && q.is_contiguous() && q.size(0) == N && q.size(1) == K && scale.numel() == N
              && coef.numel() == N && M >= 1 && M <= 8, "screened_argmax: float32 x (M <= 8, K), W (N, K), int8 Q");
  std::unique_ptr<float[]> Yb(new float[M * N]);
  float* Yp = Yb.get();
  const float *X = x.data_ptr<float>(), *S = scale.data_ptr<float>();
  const int8_t* Qp = q.data_ptr<int8_t>();
  std::vector<float> extra(M, 0.f);  // per row: the bound's term for x's own rounding, times S[n]
#if defined(SCREEN_VNNI)
  std::vector<uint8_t> X1(M * K), X2(M * K);
  std::vector<float> SX(M);
  for (int64_t r = 0; r < M; ++r)
    extra[r] = (float)(127.0 * quantize_two_level(X + r * K, K, X1.data() + r * K, X2.data() + r * K, &SX[r])
                       * (1.0 + 1e-5));
#define SCREEN_CASE(m) screen_pass_vnni<m>(X1.data(), X2.data(), SX.data(), Qp, S, Yp, N, K)
#else
#define SCREEN_CASE(m) screen_pass<m>(X, Qp, S, Yp, N, K)
#endif
  switch (M) {
    case 1: SCREEN_CASE(1); break;
    case 2: SCREEN_CASE(2); break;
    case 3: SCREEN_CASE(3); break;
    case 4: SCREEN_CASE(4); break;
    case 5: SCREEN_CASE(5); break;
    case 6: SCREEN_CASE(6); break;
    case 7: SCREEN_CASE(7); break;
    default: SCREEN_CASE(8); break;
  }
#undef SCREEN_CASE
  auto out = torch::empty({M}, torch::kLong);
  int64_t* O = out.data_ptr<int64_t>();
  const float *W = w.data_ptr<float>(), *C = coef.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    float* y = Yp + r * N;
    std::vector<int64_t> cand;
    O[r] = -1;
    if (!candidates(X + r * K, C, S, extra[r], y, N, K, cand)) continue;
    for (int64_t n : cand) rows_tile<1, 1>(X + r * K, W, nullptr, y, N, K, n, nullptr);  // linear_rows' own output
    O[r] = first_max(y, cand);
  }
  return out;
}

// ---- W8A8 at few rows (effspec.steps.quantize.w8a8): y = (q(x) . W_q[n]) * s_w[n] * s_x + b[n] ----------
// q(x) = round(x / s_x) in [-127, 127], s_x = max|x| / 127 per row (1 for an all-zero row); the dot products
// are exact int32 sums. The float steps are the torch path's, in its order, compiled without fast-math and
// without FMA contraction, so the outputs equal the oneDNN / _int_mm path's bitwise.
__attribute__((noinline, optimize("no-fast-math", "fp-contract=off")))
static float quantize_row_i8(const float* x, int64_t K, int8_t* q) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  float s = amax / 127.f;
  if (!(s > 0.f)) s = 1.f;
  for (int64_t k = 0; k < K; ++k) q[k] = (int8_t)std::min(127.f, std::max(-127.f, std::nearbyint(x[k] / s)));
  return s;
}

__attribute__((noinline, optimize("no-fast-math", "fp-contract=off")))
static float rescale(int32_t acc, float sw, float sx, const float* b) {
  const float v = (float)acc * sw;
  const float u = v * sx;
  return b ? u + *b : u;
}

// sum_k a[k] w[k] for int8 a, w in [-127, 127]: |a| (u8) times w with a's sign (s8), so byte pairs sum to
// at most 2 * 127 * 127 < 2^15 and vpmaddubsw never saturates; one vpdpbusd where AVX512-VNNI has it.
static inline int32_t dot_i8(const int8_t* a, const int8_t* w, int64_t K) {
  int64_t k = 0;
  int32_t acc = 0;
#if defined(__AVX2__)
  __m256i s = _mm256_setzero_si256();
  for (; k + 32 <= K; k += 32) {
    const __m256i av = _mm256_loadu_si256((const __m256i*)(a + k)), wv = _mm256_loadu_si256((const __m256i*)(w + k));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    s = _mm256_dpbusd_epi32(s, _mm256_abs_epi8(av), _mm256_sign_epi8(wv, av));
#else
    s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(av), _mm256_sign_epi8(wv, av)),
                                              _mm256_set1_epi16(1)));
#endif
  }
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
  acc = _mm_cvtsi128_si32(h);
#endif
  for (; k < K; ++k) acc += (int32_t)a[k] * (int32_t)w[k];
  return acc;
}

torch::Tensor w8a8_rows(torch::Tensor x, torch::Tensor wq, torch::Tensor sw, torch::Tensor bias) {
  const int64_t N = wq.size(0), K = wq.size(1), M = x.numel() / K;
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.size(-1) == K && M >= 1
              && wq.scalar_type() == torch::kChar && wq.is_contiguous() && sw.scalar_type() == torch::kFloat
              && sw.is_contiguous() && sw.numel() == N, "w8a8_rows: contiguous float32 x (..., K), int8 (N, K), float32 (N,)");
  std::vector<int8_t> q(M * K);
  std::vector<float> sx(M);
  const float* X = x.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) sx[r] = quantize_row_i8(X + r * K, K, q.data() + r * K);
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto y = torch::empty(shape, x.options());
  const int8_t* W = wq.data_ptr<int8_t>();
  const float *S = sw.data_ptr<float>(), *B = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t r = 0; r < M; ++r)
        Y[r * N + n] = rescale(dot_i8(q.data() + r * K, W + n * K, K), S[n], sx[r], B ? B + n : nullptr);
  });
  return y;
}
"""

_DECLS = """
torch::Tensor lowbit_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum,
                            torch::Tensor bias, int64_t N, int64_t K, int64_t group, int64_t bits, bool int8_act);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor silu_mul(torch::Tensor g, torch::Tensor u);
torch::Tensor rope_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                          torch::Tensor kcache, torch::Tensor vcache, int64_t start, double scale, torch::Tensor see);
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor w, torch::Tensor bias);
torch::Tensor w8a8_rows(torch::Tensor x, torch::Tensor wq, torch::Tensor sw, torch::Tensor bias);
torch::Tensor screened_argmax(torch::Tensor x, torch::Tensor w, torch::Tensor q, torch::Tensor scale,
                              torch::Tensor coef);
"""

# "int8" (default): activations rounded to int8 per 32 columns, as llama.cpp does; "float": exact float32
ACTIVATIONS = os.environ.get("EFFSPEC_KERNEL_ACTIVATIONS", "int8")
if ACTIVATIONS not in ("int8", "float"):
    raise ValueError(f"EFFSPEC_KERNEL_ACTIVATIONS={ACTIVATIONS!r}: expected int8 or float")
INT8_ACTIVATIONS = ACTIVATIONS == "int8"
EMPTY = torch.empty(0)  # "no bias"


@lru_cache(maxsize=1)
def _module():
    return compile_inline("effspec_lowbit_v27", _DECLS, _SOURCE,
                          ["lowbit_linear", "rms_norm", "silu_mul", "rope_attend", "linear_rows", "w8a8_rows",
                           "screened_argmax"],
                          "low-bit C++ kernels", "EFFSPEC_CPP_KERNELS",
                          cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], ldflags=["-fopenmp"])


def available() -> bool:
    return _module() is not None


def lowbit_linear_fn():
    """The compiled `lowbit_linear(x, codes, scale, minimum, bias, N, K, group, bits, int8_act)` itself."""
    return _module().lowbit_linear


def lowbit_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                  bias: torch.Tensor | None, n: int, k: int, group: int, bits: int,
                  activations: str | None = None) -> torch.Tensor:
    """x (..., K) float32 times the packed (N, K) weight's transpose, plus bias: (..., N) float32.

    `activations` ("int8" or "float"; default `ACTIVATIONS`) picks llama.cpp-style int8 rounding of x per
    32 columns -- ~2.5x faster here, relative error ~1e-2 -- or exact float32 arithmetic.
    """
    int8 = (activations or ACTIVATIONS) == "int8"
    return _module().lowbit_linear(x.contiguous(), codes, scale, minimum, EMPTY if bias is None else bias,
                                   n, k, group, bits, int8)


def decode_ops():
    """The compiled decode-step helpers (`rms_norm`, `silu_mul`, `rope_attend`, `linear_rows`, `w8a8_rows`), or None
    without a compiler."""
    return _module()
