"""Decode-time matrix-vector kernels for packed 4-bit and 8-bit weights, compiled on first use.

Batch-1 decode is bandwidth-bound: each token reads every weight once. torch's
own low-bit CPU kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`)
are only fast with bfloat16 activations on CPUs with AVX512-BF16; on AVX2-only
CPUs they are slower than a float32 matmul (measured here: 1536x576, one
token, int4pack 778 us against float32 425 us). These kernels read
`QuantLinear`'s own packed bytes directly -- no second copy of the weights --
and compute in float32:

    y[r, n] = sum_g  scale[n, g] * (sum_{k in g} x[r, k] q[n, k])  +  minimum[n, g] * (sum_{k in g} x[r, k])

so a group costs one integer-code dot product plus two multiply-adds. The
inner loop is plain C++ that the compiler vectorizes (`-O3 -march=native`);
rows of W are split across threads with `at::parallel_for`.

The extension is built once per machine with torch's `cpp_extension` (g++ and
ninja; ~1 minute) into torch's extension cache. When no compiler is present, or
`EFFSPEC_CPP_KERNELS=0`, `available()` is False and `QuantLinear` uses its other
paths.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
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

// x (M, K) float32 times the transpose of an (N, K) weight of codes with per-group scale and minimum
// (N, K/group) float32. NIBBLES: two codes a byte (column 2j in the low nibble of byte j, 2j+1 in the
// high), each row K/2 bytes; else one byte a code. Returns (M, N) float32.
template <bool NIBBLES>
static torch::Tensor lowbit_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum,
                                   int64_t N, int64_t K, int64_t group) {
  const int64_t M = x.size(0), G = K / group, row_bytes = NIBBLES ? K / 2 : K;
  auto y = torch::empty({M, N}, x.options());
  auto xs = torch::empty({M, G}, x.options());  // per-group sums of x, for the minimum term
  const float* X = x.data_ptr<float>();
  float* XS = xs.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < group; ++k) s += X[r * K + g * group + k];
      XS[r * G + g] = s;
    }
  // for nibbles, x split into even and odd columns so a byte's two codes meet contiguous x
  torch::Tensor xe = x, xo = x;
  if (NIBBLES) {
    xe = torch::empty({M, K / 2}, x.options());
    xo = torch::empty({M, K / 2}, x.options());
    float *XE = xe.data_ptr<float>(), *XO = xo.data_ptr<float>();
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < K / 2; ++j) {
        XE[r * K / 2 + j] = X[r * K + 2 * j];
        XO[r * K / 2 + j] = X[r * K + 2 * j + 1];
      }
  }
  const float *XE = xe.data_ptr<float>(), *XO = xo.data_ptr<float>();
  const int64_t x_stride = NIBBLES ? K / 2 : K;
  const uint8_t* P = codes.data_ptr<uint8_t>();
  const float* S = scale.data_ptr<float>();
  const float* Z = minimum.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t r = 0; r < M; ++r)
        Y[r * N + n] = row_dot<NIBBLES>(P + n * row_bytes, XE + r * x_stride, XO + r * x_stride,
                                        S + n * G, Z + n * G, XS + r * G, G, group);
  });
  return y;
}

torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor minimum,
                        int64_t N, int64_t K, int64_t group) {
  return lowbit_matmul<true>(x, packed, scale, minimum, N, K, group);
}

torch::Tensor q8_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum,
                        int64_t N, int64_t K, int64_t group) {
  return lowbit_matmul<false>(x, codes, scale, minimum, N, K, group);
}
"""

_DECLS = """
torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor minimum,
                        int64_t N, int64_t K, int64_t group);
torch::Tensor q8_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum,
                        int64_t N, int64_t K, int64_t group);
"""


@lru_cache(maxsize=1)
def _module():
    if os.environ.get("EFFSPEC_CPP_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        log.info("effspec: loading the low-bit C++ kernels (built on first use per machine, about a minute)")
        return load_inline(name="effspec_lowbit_v7", cpp_sources=[_DECLS, _SOURCE], functions=["q4_matmul", "q8_matmul"],
                           extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a read-only cache...: the other paths still work
        log.warning("effspec: low-bit C++ kernels unavailable (%s); using torch's paths", str(exc).splitlines()[0])
        return None


def available() -> bool:
    return _module() is not None


def q4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
              n: int, k: int, group: int) -> torch.Tensor:
    """x (M, K) float32 times the 4-bit packed (N, K) weight's transpose: (M, N) float32."""
    return _module().q4_matmul(x.contiguous(), packed, scale, minimum, n, k, group)


def q8_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
              n: int, k: int, group: int) -> torch.Tensor:
    """x (M, K) float32 times the 8-bit (N, K) weight's transpose: (M, N) float32."""
    return _module().q8_matmul(x.contiguous(), codes, scale, minimum, n, k, group)
