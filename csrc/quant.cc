#include "quant.h"

#include <cfloat>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <vector>

// The loops below are written so that the compiler vectorizes them without any
// licence to change results (no -ffast-math, no FMA contraction: CMake sets
// each compiler's flag for it): integer reductions instead of float min/max,
// round-half-to-even through the FPU's default rounding instead of a libm
// call, and clamps as plain selects.  Every float operation is the one
// FORMATS.md names, in its order, so the output stays bit-identical to the
// torch reference.
//
// On x86-64 each row quantizer is compiled twice, once for AVX2 and once for
// the baseline ISA, and picked at load time from CPUID (IEEE results do not
// depend on the vector width). This is done by hand rather than with GCC's
// target_clones, which MSVC, Apple clang and mingw (no ifunc) lack. The hot
// loops also have hand-written AVX2 versions doing the same IEEE operations in
// the same order: vectorized portable loops spend most of their time on the
// clamps and the nibble pairing.
#include "cpu_dispatch.h"
#ifdef GS_X86_64
#include <immintrin.h>
#define GS_AVX2_KERNELS 1
#endif

#include "file.h"

namespace gs {
namespace {

// Adding and subtracting 1.5 * 2^23 rounds to an integer, ties to even, in the
// default rounding mode: exact for |v| < 2^22.  Beyond that the result is still
// beyond every clamp bound used here (and +-inf stays inf), so
// clamp(round_even(v)) == clamp(nearbyint(v)) for every non-NaN v.
constexpr float kRoundMagic = 12582912.0f;
inline float round_even(float v) { return (v + kRoundMagic) - kRoundMagic; }

// NaN -> 0, which is what torch's float -> int8 conversion gives: a NaN quotient
// only arises as 0 / 0 when an f16 scale underflows to 0 (the row then
// dequantizes to 0 whatever q holds).
inline float clamp(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  v = v > hi ? hi : v;
  return v == v ? v : 0.0f;
}

// v > lo ? v : lo is x86's maxps(v, lo) and v < hi ? v : hi its minps(v, hi),
// which GCC vectorizes well: a NaN v comes out as lo. Used where lo is the
// answer NaN must give, or where no NaN can occur.
inline float clamp_nan_lo(float v, float lo, float hi) {
  v = v > lo ? v : lo;
  return v < hi ? v : hi;
}

inline uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

constexpr uint32_t kMaxFiniteBits = 0x7F7FFFFFu;  // FLT_MAX

// max |w| as bits: |w| orders like its bit pattern (inf and NaN above FLT_MAX),
// so one integer reduction gives both the amax and the finiteness check.
inline uint32_t max_abs_bits(const float* w, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t a = bits(w[i]) & 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  return m;
}

// Finite floats ordered as signed integers (the sign-magnitude to two's
// complement flip; -0 sorts just below +0, which neither min nor max below can
// tell apart in a result).
inline int32_t order_key(float f) {
  const int32_t i = static_cast<int32_t>(bits(f));
  return i ^ ((i >> 31) & 0x7FFFFFFF);
}
constexpr int32_t kMaxFiniteKey = 0x7F7FFFFF;                  // order_key(FLT_MAX)
constexpr int32_t kMinFiniteKey = INT32_MIN + 0x00800000;     // order_key(-FLT_MAX)
inline float from_key(int32_t k) { return from_bits(static_cast<uint32_t>(k ^ ((k >> 31) & 0x7FFFFFFF))); }

// `value` rounded to the scale dtype (non-NaN values only), as store_float +
// load_float would give; bf16 and f32 inline, they are computed once per group.
inline float round_to(float value, DType dtype) {
  if (dtype == DType::F32) return value;
  if (dtype == DType::BF16) {
    const uint32_t u = bits(value);
    return from_bits(((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) << 16);
  }
  float stored;
  store_float(value, &stored, dtype, 0);  // writes the first 2 bytes of `stored`
  return load_float(&stored, dtype, 0);
}

inline void store_scale(float rounded, void* dst, DType dtype, std::size_t i) {
  if (dtype == DType::F32) static_cast<float*>(dst)[i] = rounded;
  else if (dtype == DType::BF16) static_cast<uint16_t*>(dst)[i] = static_cast<uint16_t>(bits(rounded) >> 16);
  else store_float(rounded, dst, dtype, i);  // exact: `rounded` is an f16 value
}

#ifdef GS_AVX2_KERNELS
// allow_avx2 = false forces the portable loops (the tests check that both agree).
const bool kCpuAvx2 = cpu_has_avx2();

// out[k] = int8(clamp(round_even(w[k] / s), -127, 127)) for k < n, n % 32 == 0.
// s != 0, so no quotient is NaN.
GS_TARGET_AVX2 void int8_quant_avx2(const float* w, int64_t n, float s, int8_t* out) {
  const __m256 vs = _mm256_set1_ps(s), magic = _mm256_set1_ps(kRoundMagic);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t k = 0; k < n; k += 32) {
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      __m256 v = _mm256_div_ps(_mm256_loadu_ps(w + k + 8 * i), vs);
      v = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
      v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
      q[i] = _mm256_cvttps_epi32(v);
    }
    // packs work per 128-bit lane; the permute puts the dwords back in order.
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm256_permutevar8x32_epi32(b, order));
  }
}

// Smallest and largest order_key over n floats, n % 8 == 0.
GS_TARGET_AVX2 void key_range_avx2(const float* w, int64_t n, int32_t* lo_out, int32_t* hi_out) {
  const __m256i mag = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i lo = _mm256_set1_epi32(INT32_MAX), hi = _mm256_set1_epi32(INT32_MIN);
  for (int64_t k = 0; k < n; k += 8) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m256i key = _mm256_xor_si256(x, _mm256_and_si256(_mm256_srai_epi32(x, 31), mag));
    lo = _mm256_min_epi32(lo, key);
    hi = _mm256_max_epi32(hi, key);
  }
  alignas(32) int32_t l[8], h[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(h), hi);
  int32_t a = l[0], b = h[0];
  for (int i = 1; i < 8; ++i) {
    a = l[i] < a ? l[i] : a;
    b = h[i] > b ? h[i] : b;
  }
  *lo_out = a;
  *hi_out = b;
}

// One group of n floats (n % 16 == 0) to n / 2 bytes: nibble
// clamp(round_even((w - z) / s) + 8, 0, 15), NaN -> 0, even k in the low nibble.
GS_TARGET_AVX2 void int4_quant_avx2(const float* w, int64_t n, float z, float s, uint8_t* out) {
  const __m256 vz = _mm256_set1_ps(z), vs = _mm256_set1_ps(s), magic = _mm256_set1_ps(kRoundMagic);
  const __m256 eight = _mm256_set1_ps(8.0f), zero = _mm256_setzero_ps(), fifteen = _mm256_set1_ps(15.0f);
  const __m256i first_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                               0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  for (int64_t k = 0; k < n; k += 16) {
    __m256i q[2];
    for (int i = 0; i < 2; ++i) {
      __m256 v = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(w + k + 8 * i), vz), vs);
      v = _mm256_add_ps(_mm256_sub_ps(_mm256_add_ps(v, magic), magic), eight);
      v = _mm256_min_ps(_mm256_max_ps(v, zero), fifteen);  // maxps(NaN, 0) is 0
      q[i] = _mm256_cvttps_epi32(v);
    }
    // 16 values as u16 in order, then each dword (even | odd << 16) folds to
    // one byte (even | odd << 4), and the low byte of each dword is kept.
    __m256i c = _mm256_permute4x64_epi64(_mm256_packus_epi32(q[0], q[1]), 0xD8);
    c = _mm256_shuffle_epi8(_mm256_or_si256(c, _mm256_srli_epi32(c, 12)), first_bytes);
    const __m128i bytes = _mm_unpacklo_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k / 2), bytes);
  }
}
#endif

}  // namespace

namespace {

// The row quantizers' bodies; kAvx2 says whether the caller was compiled for
// AVX2 (then the hand-written kernels run too).
template <bool kAvx2>
GS_ALWAYS_INLINE int64_t int8_rows(const void* src, DType src_dtype, int64_t rows, int64_t K,
                                   int8_t* q, void* scale, DType scale_dtype, float* w) {
  const std::size_t row_bytes = static_cast<std::size_t>(K) * itemsize(src_dtype);
  for (int64_t r = 0; r < rows; ++r) {
    to_float(static_cast<const char*>(src) + r * row_bytes, src_dtype, w, static_cast<std::size_t>(K));
    const uint32_t amax_bits = max_abs_bits(w, K);
    if (amax_bits > kMaxFiniteBits) return r;
    const float amax = from_bits(amax_bits);
    const float s = amax == 0.0f ? 1.0f : round_to(amax / 127.0f, scale_dtype);
    store_scale(s, scale, scale_dtype, static_cast<std::size_t>(r));
    int8_t* out = q + r * K;
    int64_t k = 0;
    if (s != 0.0f) {  // no NaN quotient (an f16 scale that underflows to 0 gives 0 / 0)
#ifdef GS_AVX2_KERNELS
      if constexpr (kAvx2) {
        k = K - K % 32;
        int8_quant_avx2(w, k, s, out);
      }
#endif
      for (; k < K; ++k)
        out[k] = static_cast<int8_t>(static_cast<int32_t>(clamp_nan_lo(round_even(w[k] / s), -127.0f, 127.0f)));
    }
    for (; k < K; ++k)
      out[k] = static_cast<int8_t>(static_cast<int32_t>(clamp(round_even(w[k] / s), -127.0f, 127.0f)));
  }
  return -1;
}

template <bool kAvx2>
GS_ALWAYS_INLINE int64_t int4_rows(const void* src, DType src_dtype, int64_t rows, int64_t K, int64_t G,
                                   uint8_t* q, void* scale, void* zero, DType scale_dtype, float* w) {
  const std::size_t row_bytes = static_cast<std::size_t>(K) * itemsize(src_dtype);
  const int64_t groups = K / G;
  constexpr int64_t kBlock = 256;  // nibbles are computed into a small buffer, then paired
  uint8_t nibbles[kBlock];
  constexpr int64_t kGroupBlock = 64;
  int32_t lo[kGroupBlock], hi[kGroupBlock];
  float s[kGroupBlock], z[kGroupBlock];
#ifdef GS_AVX2_KERNELS
  const bool avx2 = kAvx2 && G % 16 == 0;
#endif
  for (int64_t r = 0; r < rows; ++r) {
    to_float(static_cast<const char*>(src) + r * row_bytes, src_dtype, w, static_cast<std::size_t>(K));
    uint8_t* out = q + r * (K / 2);
    for (int64_t g0 = 0; g0 < groups; g0 += kGroupBlock) {
      const int64_t ng = groups - g0 < kGroupBlock ? groups - g0 : kGroupBlock;
      // Key ranges of a block of groups first, then their scales, then the
      // nibbles: the groups' short serial chains (reduce, divide, round)
      // overlap instead of stalling each group's quantization loop.
#ifdef GS_AVX2_KERNELS
      if (avx2) {
        for (int64_t i = 0; i < ng; ++i) key_range_avx2(w + (g0 + i) * G, G, &lo[i], &hi[i]);
      } else
#endif
      {
        for (int64_t i = 0; i < ng; ++i) {
          const float* wg = w + (g0 + i) * G;
          int32_t l = order_key(wg[0]), h = l;
          for (int64_t k = 1; k < G; ++k) {
            const int32_t key = order_key(wg[k]);
            l = key < l ? key : l;
            h = key > h ? key : h;
          }
          lo[i] = l;
          hi[i] = h;
        }
      }
      // Infinities and NaNs have keys beyond those of -FLT_MAX and FLT_MAX: the
      // ranges double as the finiteness check, before anything of the block is written.
      for (int64_t i = 0; i < ng; ++i)
        if (lo[i] < kMinFiniteKey || hi[i] > kMaxFiniteKey) return r;
      for (int64_t i = 0; i < ng; ++i) {
        const float mn = from_key(lo[i]), mx = from_key(hi[i]);
        const float range_step = (mx - mn) / 15.0f;
        const float sc = round_to(range_step > FLT_EPSILON ? range_step : FLT_EPSILON, scale_dtype);
        const float eight_s = 8.0f * sc;  // a multiply, then an add: no FMA, as torch
        s[i] = sc;
        z[i] = round_to(mn + eight_s, scale_dtype);
        const std::size_t at = static_cast<std::size_t>(r * groups + g0 + i);
        store_scale(s[i], scale, scale_dtype, at);
        store_scale(z[i], zero, scale_dtype, at);
      }
      for (int64_t i = 0; i < ng; ++i) {
        const int64_t g = g0 + i;
        const float* wg = w + g * G;
#ifdef GS_AVX2_KERNELS
        if (avx2) {
          int4_quant_avx2(wg, G, z[i], s[i], out + g * G / 2);
          continue;
        }
#endif
        for (int64_t k0 = 0; k0 < G; k0 += kBlock) {  // G is even (checked by the executor)
          const int64_t n = G - k0 < kBlock ? G - k0 : kBlock;
          for (int64_t k = 0; k < n; ++k)  // clamp_nan_lo: NaN -> 0, as torch's float -> int
            nibbles[k] = static_cast<uint8_t>(
                static_cast<int32_t>(clamp_nan_lo(round_even((wg[k0 + k] - z[i]) / s[i]) + 8.0f, 0.0f, 15.0f)));
          uint8_t* og = out + (g * G + k0) / 2;
          for (int64_t j = 0; j < n / 2; ++j)
            og[j] = static_cast<uint8_t>(nibbles[2 * j] | (nibbles[2 * j + 1] << 4));
        }
      }
    }
  }
  return -1;
}

#ifdef GS_AVX2_KERNELS
GS_TARGET_AVX2 int64_t int8_rows_avx2(const void* src, DType src_dtype, int64_t rows, int64_t K, int8_t* q,
                                      void* scale, DType scale_dtype, float* w) {
  return int8_rows<true>(src, src_dtype, rows, K, q, scale, scale_dtype, w);
}

GS_TARGET_AVX2 int64_t int4_rows_avx2(const void* src, DType src_dtype, int64_t rows, int64_t K, int64_t G,
                                      uint8_t* q, void* scale, void* zero, DType scale_dtype, float* w) {
  return int4_rows<true>(src, src_dtype, rows, K, G, q, scale, zero, scale_dtype, w);
}
#endif

}  // namespace

int64_t quantize_int8_rows(const void* src, DType src_dtype, int64_t rows, int64_t K,
                           int8_t* q, void* scale, DType scale_dtype, float* w, bool allow_avx2) {
#ifdef GS_AVX2_KERNELS
  if (allow_avx2 && kCpuAvx2) return int8_rows_avx2(src, src_dtype, rows, K, q, scale, scale_dtype, w);
#else
  (void)allow_avx2;
#endif
  return int8_rows<false>(src, src_dtype, rows, K, q, scale, scale_dtype, w);
}

int64_t quantize_int4_rows(const void* src, DType src_dtype, int64_t rows, int64_t K, int64_t G,
                           uint8_t* q, void* scale, void* zero, DType scale_dtype, float* w,
                           bool allow_avx2) {
#ifdef GS_AVX2_KERNELS
  if (allow_avx2 && kCpuAvx2) return int4_rows_avx2(src, src_dtype, rows, K, G, q, scale, zero, scale_dtype, w);
#else
  (void)allow_avx2;
#endif
  return int4_rows<false>(src, src_dtype, rows, K, G, q, scale, zero, scale_dtype, w);
}

const char* quant_kernels(bool allow_avx2) {
#ifdef GS_AVX2_KERNELS
  if (allow_avx2 && kCpuAvx2) return "avx2";
#else
  (void)allow_avx2;
#endif
  return "portable";
}

}  // namespace gs
