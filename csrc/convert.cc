#include "convert.h"

#include <cstring>

#include "file.h"  // cpu_has_avx2

#include "cpu_dispatch.h"

namespace gs {
namespace {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// c ? a : b as a mask blend: the compiler keeps it a select, where a ternary
// over float results may become a branch that blocks vectorization.
inline uint32_t select(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

// The kernels below are branch-free (selects, not ifs) so the compiler
// vectorizes the loops that call them; every result is the one the scalar
// IEEE definition gives, bit for bit (tests run all 2^16 half inputs).
//
// NaN handling follows torch's vectorized CPU kernels (what Tensor.to runs for
// real tensors): f32->bf16 writes 0xFFFF for every NaN; f16/bf16->f16 NaNs keep
// sign and the top payload bits, quiet bit set; f16->f32 NaNs likewise.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0xFFFFu : rounded);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent and mantissa, f32 position
  const uint32_t exp = em & 0x0F800000u;
  const uint32_t normal = em + (112u << 23);  // rebias 15 -> 127
  // inf keeps an all-ones exponent; NaN also gets the quiet bit
  const uint32_t special = em | 0x7F800000u | select((em & 0x7FFFFFu) != 0, 0x400000u, 0u);
  // subnormal or zero: 2^-14 * (1 + m / 2^10) - 2^-14 = m * 2^-24, exact
  const uint32_t tiny = f32_bits(bits_f32(em + (113u << 23)) - bits_f32(113u << 23));
  const uint32_t out = select(exp == 0x0F800000u, special, select(exp == 0, tiny, normal));
  return bits_f32(sign | out);
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7FFFFFFFu;
  // NaN keeps its top payload bits, quiet bit set; |f| >= 65520 rounds to inf
  const uint32_t nan = 0x7E00u | ((abs & 0x7FFFFFu) >> 13);
  const uint32_t huge = select(abs > 0x7F800000u, nan, 0x7C00u);
  // normal: rebias the exponent, round the mantissa from 23 to 10 bits, ties to even
  // (a carry out of the mantissa bumps the exponent, up to inf, as it should)
  const uint32_t v = abs - (112u << 23);
  const uint32_t normal = (v + 0xFFFu + ((v >> 13) & 1u)) >> 13;
  // f16-subnormal or zero: adding 0.5 puts the 2^-24 units in the low mantissa
  // bits, and the FPU's round-to-nearest-even rounds them
  const uint32_t tiny = f32_bits(bits_f32(abs) + 0.5f) - f32_bits(0.5f);
  const uint32_t out = select(abs >= 0x477FF000u, huge, select(abs < 0x38800000u, tiny, normal));
  return static_cast<uint16_t>(sign | out);
}

inline uint16_t f16_to_bf16(uint16_t h) {
  const bool nan = (h & 0x7C00u) == 0x7C00u && (h & 0x3FFu);
  const uint16_t value = f32_to_bf16(f16_to_f32(h));
  return static_cast<uint16_t>(select(nan, 0x7FC0u, value));
}

inline uint16_t bf16_to_f16(uint16_t h) { return f32_to_f16(bf16_to_f32(h)); }

// One vectorizable loop per conversion, compiled twice on x86-64 (AVX2 and
// the baseline ISA) and picked at load time from CPUID; IEEE results do not
// depend on the vector width. Written out by hand rather than with GCC's
// target_clones, which MSVC, Apple clang and mingw (no ifunc) lack.
template <typename S, typename D, D (*Fn)(S)>
GS_ALWAYS_INLINE void convert_loop(const S* s, D* d, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) d[i] = Fn(s[i]);
}

#ifdef GS_X86_64
const bool kAvx2 = cpu_has_avx2();

template <typename S, typename D, D (*Fn)(S)>
GS_TARGET_AVX2 void convert_loop_avx2(const S* s, D* d, std::size_t n) {
  convert_loop<S, D, Fn>(s, d, n);
}
#endif

template <typename S, typename D, D (*Fn)(S)>
void convert_n(const S* s, D* d, std::size_t n) {
#ifdef GS_X86_64
  if (kAvx2) return convert_loop_avx2<S, D, Fn>(s, d, n);
#endif
  convert_loop<S, D, Fn>(s, d, n);
}

void f32_to_bf16_n(const float* s, uint16_t* d, std::size_t n) { convert_n<float, uint16_t, f32_to_bf16>(s, d, n); }
void f32_to_f16_n(const float* s, uint16_t* d, std::size_t n) { convert_n<float, uint16_t, f32_to_f16>(s, d, n); }
void bf16_to_f32_n(const uint16_t* s, float* d, std::size_t n) { convert_n<uint16_t, float, bf16_to_f32>(s, d, n); }
void f16_to_f32_n(const uint16_t* s, float* d, std::size_t n) { convert_n<uint16_t, float, f16_to_f32>(s, d, n); }
void f16_to_bf16_n(const uint16_t* s, uint16_t* d, std::size_t n) {
  convert_n<uint16_t, uint16_t, f16_to_bf16>(s, d, n);
}
void bf16_to_f16_n(const uint16_t* s, uint16_t* d, std::size_t n) {
  convert_n<uint16_t, uint16_t, bf16_to_f16>(s, d, n);
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
    case DType::BF16: bf16_to_f32_n(static_cast<const uint16_t*>(src), dst, n); return;
    case DType::F16: f16_to_f32_n(static_cast<const uint16_t*>(src), dst, n); return;
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
  const auto* s16 = static_cast<const uint16_t*>(src);
  auto* d16 = static_cast<uint16_t*>(dst);
  if (s == DType::F32) {
    const float* f = static_cast<const float*>(src);
    if (d == DType::BF16) f32_to_bf16_n(f, d16, n);
    else f32_to_f16_n(f, d16, n);
    return;
  }
  if (d == DType::F32) { to_float(src, s, static_cast<float*>(dst), n); return; }
  if (s == DType::F16) f16_to_bf16_n(s16, d16, n);
  else bf16_to_f16_n(s16, d16, n);
}

void normalize_bool(char* data, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) data[i] = data[i] != 0;
}

}  // namespace gs
