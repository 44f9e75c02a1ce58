#include "quant.h"

#include <cfloat>
#include <cmath>

namespace gs {
namespace {

inline float round_to(float value, DType dtype) {
  float stored;
  store_float(value, &stored, dtype, 0);  // writes the first 2 or 4 bytes of `stored`
  return load_float(&stored, dtype, 0);
}

inline bool all_finite(const float* w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) if (!std::isfinite(w[i])) return false;
  return true;
}

}  // namespace

int64_t quantize_int8_rows(const void* src, DType src_dtype, int64_t rows, int64_t K,
                           int8_t* q, void* scale, DType scale_dtype, float* w) {
  const std::size_t row_bytes = static_cast<std::size_t>(K) * itemsize(src_dtype);
  for (int64_t r = 0; r < rows; ++r) {
    to_float(static_cast<const char*>(src) + r * row_bytes, src_dtype, w, static_cast<std::size_t>(K));
    if (!all_finite(w, K)) return r;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(w[k]));
    const float s = amax == 0.0f ? 1.0f : round_to(amax / 127.0f, scale_dtype);
    store_float(s, scale, scale_dtype, static_cast<std::size_t>(r));
    int8_t* out = q + r * K;
    for (int64_t k = 0; k < K; ++k) {
      float v = std::nearbyint(w[k] / s);
      v = std::fmin(std::fmax(v, -127.0f), 127.0f);
      out[k] = static_cast<int8_t>(v);
    }
  }
  return -1;
}

int64_t quantize_int4_rows(const void* src, DType src_dtype, int64_t rows, int64_t K, int64_t G,
                           uint8_t* q, void* scale, void* zero, DType scale_dtype, float* w) {
  const std::size_t row_bytes = static_cast<std::size_t>(K) * itemsize(src_dtype);
  const int64_t groups = K / G;
  for (int64_t r = 0; r < rows; ++r) {
    to_float(static_cast<const char*>(src) + r * row_bytes, src_dtype, w, static_cast<std::size_t>(K));
    if (!all_finite(w, K)) return r;
    uint8_t* out = q + r * (K / 2);
    for (int64_t g = 0; g < groups; ++g) {
      const float* wg = w + g * G;
      float mn = wg[0], mx = wg[0];
      for (int64_t k = 1; k < G; ++k) { mn = std::fmin(mn, wg[k]); mx = std::fmax(mx, wg[k]); }
      const float s = round_to(std::fmax((mx - mn) / 15.0f, FLT_EPSILON), scale_dtype);
      const float eight_s = 8.0f * s;  // separate multiply and add: no FMA, as torch
      const float z = round_to(mn + eight_s, scale_dtype);
      const std::size_t at = static_cast<std::size_t>(r * groups + g);
      store_float(s, scale, scale_dtype, at);
      store_float(z, zero, scale_dtype, at);
      for (int64_t k = 0; k < G; k += 2) {
        float a = std::nearbyint((wg[k] - z) / s) + 8.0f;
        float b = std::nearbyint((wg[k + 1] - z) / s) + 8.0f;
        a = std::fmin(std::fmax(a, 0.0f), 15.0f);
        b = std::fmin(std::fmax(b, 0.0f), 15.0f);
        out[(g * G + k) / 2] = static_cast<uint8_t>(static_cast<unsigned>(a) | (static_cast<unsigned>(b) << 4));
      }
    }
  }
  return -1;
}

}  // namespace gs
