#include "quant.h"

#include <cfloat>
#include <cstring>
#include <vector>

// The loops below are written so that the compiler vectorizes them without any
// licence to change results (no -ffast-math, -ffp-contract=off): integer
// reductions instead of float min/max, round-half-to-even through the FPU's
// default rounding instead of a libm call, and clamps as plain selects.  Every
// float operation is the one FORMATS.md names, in its order, so the output
// stays bit-identical to the torch reference.  An AVX2 clone is picked at load
// time on x86-64 (IEEE results do not depend on the vector width).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GS_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GS_VECTOR_CLONES
#endif

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
inline float from_key(int32_t k) { return from_bits(static_cast<uint32_t>(k ^ ((k >> 31) & 0x7FFFFFFF))); }

inline float round_to(float value, DType dtype) {
  float stored;
  store_float(value, &stored, dtype, 0);  // writes the first 2 or 4 bytes of `stored`
  return load_float(&stored, dtype, 0);
}

}  // namespace

GS_VECTOR_CLONES
int64_t quantize_int8_rows(const void* src, DType src_dtype, int64_t rows, int64_t K,
                           int8_t* q, void* scale, DType scale_dtype, float* w) {
  const std::size_t row_bytes = static_cast<std::size_t>(K) * itemsize(src_dtype);
  for (int64_t r = 0; r < rows; ++r) {
    to_float(static_cast<const char*>(src) + r * row_bytes, src_dtype, w, static_cast<std::size_t>(K));
    const uint32_t amax_bits = max_abs_bits(w, K);
    if (amax_bits > kMaxFiniteBits) return r;
    const float amax = from_bits(amax_bits);
    const float s = amax == 0.0f ? 1.0f : round_to(amax / 127.0f, scale_dtype);
    store_float(s, scale, scale_dtype, static_cast<std::size_t>(r));
    int8_t* out = q + r * K;
    for (int64_t k = 0; k < K; ++k)
      out[k] = static_cast<int8_t>(static_cast<int32_t>(clamp(round_even(w[k] / s), -127.0f, 127.0f)));
  }
  return -1;
}

GS_VECTOR_CLONES
int64_t quantize_int4_rows(const void* src, DType src_dtype, int64_t rows, int64_t K, int64_t G,
                           uint8_t* q, void* scale, void* zero, DType scale_dtype, float* w) {
  const std::size_t row_bytes = static_cast<std::size_t>(K) * itemsize(src_dtype);
  const int64_t groups = K / G;
  constexpr int64_t kBlock = 256;  // nibbles are computed into a small buffer, then paired
  uint8_t nibbles[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    to_float(static_cast<const char*>(src) + r * row_bytes, src_dtype, w, static_cast<std::size_t>(K));
    if (max_abs_bits(w, K) > kMaxFiniteBits) return r;
    uint8_t* out = q + r * (K / 2);
    for (int64_t g = 0; g < groups; ++g) {
      const float* wg = w + g * G;
      int32_t lo = order_key(wg[0]), hi = lo;
      for (int64_t k = 1; k < G; ++k) {
        const int32_t key = order_key(wg[k]);
        lo = key < lo ? key : lo;
        hi = key > hi ? key : hi;
      }
      const float mn = from_key(lo), mx = from_key(hi);
      const float range_step = (mx - mn) / 15.0f;
      const float s = round_to(range_step > FLT_EPSILON ? range_step : FLT_EPSILON, scale_dtype);
      const float eight_s = 8.0f * s;  // a multiply, then an add: no FMA, as torch
      const float z = round_to(mn + eight_s, scale_dtype);
      const std::size_t at = static_cast<std::size_t>(r * groups + g);
      store_float(s, scale, scale_dtype, at);
      store_float(z, zero, scale_dtype, at);
      for (int64_t k0 = 0; k0 < G; k0 += kBlock) {  // G is even (checked by the executor)
        const int64_t n = G - k0 < kBlock ? G - k0 : kBlock;
        for (int64_t k = 0; k < n; ++k)
          nibbles[k] = static_cast<uint8_t>(
              static_cast<int32_t>(clamp(round_even((wg[k0 + k] - z) / s) + 8.0f, 0.0f, 15.0f)));
        uint8_t* og = out + (g * G + k0) / 2;
        for (int64_t j = 0; j < n / 2; ++j)
          og[j] = static_cast<uint8_t>(nibbles[2 * j] | (nibbles[2 * j + 1] << 4));
      }
    }
  }
  return -1;
}

namespace {

// Row pair `j` of a block of `b` rows.
inline int64_t low_row(int64_t j, bool halves) { return halves ? j : 2 * j; }
inline int64_t high_row(int64_t j, int64_t b, bool halves) { return halves ? j + b / 2 : 2 * j + 1; }

// One block: plain [b, K/2] <-> kernel [K, b/2]. Byte m of a plain row holds
// k = 2m (low nibble) and 2m + 1 (high); the kernel's rows 2m and 2m + 1 hold
// those k for the b/2 row pairs.
void pack_block(const uint8_t* plain, uint8_t* kernel, int64_t b, int64_t half_k, bool halves) {
  const int64_t half_b = b / 2;
  for (int64_t j = 0; j < half_b; ++j) {
    const uint8_t* x = plain + low_row(j, halves) * half_k;
    const uint8_t* y = plain + high_row(j, b, halves) * half_k;
    uint8_t* out = kernel + j;
    for (int64_t m = 0; m < half_k; ++m) {
      out[(2 * m) * half_b] = static_cast<uint8_t>((x[m] & 0x0F) | (y[m] << 4));
      out[(2 * m + 1) * half_b] = static_cast<uint8_t>((x[m] >> 4) | (y[m] & 0xF0));
    }
  }
}

void unpack_block(const uint8_t* kernel, uint8_t* plain, int64_t b, int64_t half_k, bool halves) {
  const int64_t half_b = b / 2;
  for (int64_t j = 0; j < half_b; ++j) {
    uint8_t* x = plain + low_row(j, halves) * half_k;
    uint8_t* y = plain + high_row(j, b, halves) * half_k;
    const uint8_t* in = kernel + j;
    for (int64_t m = 0; m < half_k; ++m) {
      const uint8_t even = in[(2 * m) * half_b], odd = in[(2 * m + 1) * half_b];
      x[m] = static_cast<uint8_t>((even & 0x0F) | (odd << 4));
      y[m] = static_cast<uint8_t>((even >> 4) | (odd & 0xF0));
    }
  }
}

template <typename BlockFn>
bool for_each_block(uint8_t* data, int64_t rows, int64_t K, int64_t block, bool halves, BlockFn fn) {
  if (rows <= 0 || K <= 0 || block <= 0 || rows % 2 || K % 2 || block % 2) return false;
  const int64_t half_k = K / 2;
  std::vector<uint8_t> scratch(static_cast<std::size_t>(block * half_k));
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t b = rows - r0 < block ? rows - r0 : block;
    uint8_t* at = data + r0 * half_k;
    const std::size_t bytes = static_cast<std::size_t>(b * half_k);
    fn(at, scratch.data(), b, half_k, b == block && halves);
    std::memcpy(at, scratch.data(), bytes);
  }
  return true;
}

}  // namespace

bool int4_to_cpu_kernel_layout(uint8_t* data, int64_t rows, int64_t K, int64_t block, bool halves) {
  return for_each_block(data, rows, K, block, halves, pack_block);
}

bool int4_from_cpu_kernel_layout(uint8_t* data, int64_t rows, int64_t K, int64_t block, bool halves) {
  return for_each_block(data, rows, K, block, halves, unpack_block);
}

}  // namespace gs
