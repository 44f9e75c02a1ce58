// Element types and conversion kernels, bit-exact with torch's Tensor.to on CPU.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gs {

// Codes shared with python/gemma_stream/dtypes.py; change both together.
enum class DType : int {
  Bool = 0, U8 = 1, I8 = 2, I16 = 3, U16 = 4, I32 = 5, U32 = 6, I64 = 7, U64 = 8,
  F16 = 9, BF16 = 10, F32 = 11, F64 = 12, F8E4M3 = 13, F8E5M2 = 14, C64 = 15, C128 = 16,
};

bool dtype_valid(int code);
std::size_t itemsize(DType dtype);
const char* dtype_name(DType dtype);
// True for the pairs `convert` handles: identical dtypes, or two of f16/bf16/f32.
bool can_convert(DType src, DType dst);

// Converts n elements. Same dtype is a memcpy. Otherwise src and dst must be
// one of f16/bf16/f32 (checked by the caller with can_convert).
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n);

// torch's copy_ stores a bool as 0 or 1 whatever byte the file holds; so does
// the engine, on every path, so both executors and
// model.load_state_dict(torch.load(..)) agree.
void normalize_bool(char* data, std::size_t n);

// Upcasts n elements of f16/bf16/f32 to float (exact).
void to_float(const void* src, DType src_dtype, float* dst, std::size_t n);
// Rounds one float to f16/bf16/f32 storage (round-to-nearest-even), writing dst[i].
void store_float(float value, void* dst, DType dst_dtype, std::size_t i);
// The float a stored f16/bf16/f32 value stands for.
float load_float(const void* src, DType src_dtype, std::size_t i);

}  // namespace gs
