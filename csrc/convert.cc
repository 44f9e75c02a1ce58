#include "convert.h"

#include <cstring>

namespace gs {
namespace {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// NaN handling follows torch's vectorized CPU kernels (what Tensor.to runs for
// real tensors): f32->bf16 writes 0xFFFF for every NaN; f16/bf16->f16 NaNs keep
// sign and the top payload bits, quiet bit set; f16->f32 NaNs likewise.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFu;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) {
    if (mant == 0) return bits_f32(sign | 0x7F800000u);
    return bits_f32(sign | 0x7FC00000u | (mant << 13));
  }
  if (exp == 0) {
    if (mant == 0) return bits_f32(sign);
    // subnormal: value = mant * 2^-24, exactly representable in f32
    float v = static_cast<float>(mant) * bits_f32(0x33800000u);  // 2^-24
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((abs & 0x7FFFFFu) >> 13));
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to inf
  if (abs < 0x38800000u) {
    // result is f16-subnormal (or zero): round abs * 2^24 to an integer, ties to even.
    const uint32_t exp = abs >> 23;
    if (exp < 102u) return sign;  // below half the smallest subnormal
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14..24
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  // normal: rebias exponent, round mantissa from 23 to 10 bits (carry may bump exponent)
  uint32_t v = abs - 0x38000000u;
  v += 0xFFFu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}

inline uint16_t f16_to_bf16(uint16_t h) {
  if ((h & 0x7C00u) == 0x7C00u && (h & 0x3FFu)) return 0x7FC0u;
  return f32_to_bf16(f16_to_f32(h));
}

template <typename Fn>
inline void map16(const void* src, void* dst, std::size_t n, Fn fn) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  uint16_t* d = static_cast<uint16_t*>(dst);
  for (std::size_t i = 0; i < n; ++i) d[i] = fn(s[i]);
}

}  // namespace

bool dtype_valid(int code) { return code >= 0 && code <= 16; }

std::size_t itemsize(DType dtype) {
  switch (dtype) {
    case DType::Bool: case DType::U8: case DType::I8: case DType::F8E4M3: case DType::F8E5M2: return 1;
    case DType::I16: case DType::U16: case DType::F16: case DType::BF16: return 2;
    case DType::I32: case DType::U32: case DType::F32: return 4;
    case DType::I64: case DType::U64: case DType::F64: case DType::C64: return 8;
    case DType::C128: return 16;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  static const char* names[] = {"bool", "u8", "i8", "i16", "u16", "i32", "u32", "i64", "u64",
                                "f16", "bf16", "f32", "f64", "f8_e4m3", "f8_e5m2", "c64", "c128"};
  const int code = static_cast<int>(dtype);
  return dtype_valid(code) ? names[code] : "?";
}

static bool is_convertible_float(DType d) { return d == DType::F16 || d == DType::BF16 || d == DType::F32; }

bool can_convert(DType src, DType dst) {
  return src == dst || (is_convertible_float(src) && is_convertible_float(dst));
}

void to_float(const void* src, DType src_dtype, float* dst, std::size_t n) {
  switch (src_dtype) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (std::size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    default: return;
  }
}

float load_float(const void* src, DType src_dtype, std::size_t i) {
  switch (src_dtype) {
    case DType::F32: return static_cast<const float*>(src)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
    default: return 0.0f;
  }
}

void store_float(float value, void* dst, DType dst_dtype, std::size_t i) {
  switch (dst_dtype) {
    case DType::F32: static_cast<float*>(dst)[i] = value; return;
    case DType::BF16: static_cast<uint16_t*>(dst)[i] = f32_to_bf16(value); return;
    case DType::F16: static_cast<uint16_t*>(dst)[i] = f32_to_f16(value); return;
    default: return;
  }
}

void convert(const void* src, DType s, void* dst, DType d, std::size_t n) {
  if (s == d) { std::memcpy(dst, src, n * itemsize(s)); return; }
  if (s == DType::F32) {
    const float* f = static_cast<const float*>(src);
    uint16_t* o = static_cast<uint16_t*>(dst);
    if (d == DType::BF16) for (std::size_t i = 0; i < n; ++i) o[i] = f32_to_bf16(f[i]);
    else for (std::size_t i = 0; i < n; ++i) o[i] = f32_to_f16(f[i]);
    return;
  }
  if (d == DType::F32) { to_float(src, s, static_cast<float*>(dst), n); return; }
  if (s == DType::F16) map16(src, dst, n, f16_to_bf16);  // f16 -> bf16
  else map16(src, dst, n, [](uint16_t h) { return f32_to_f16(bf16_to_f32(h)); });  // bf16 -> f16
}

}  // namespace gs
