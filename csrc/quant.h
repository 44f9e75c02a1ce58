// Quantize-on-read kernels following docs/FORMATS.md ("gemma_stream
// quantized layouts"). All arithmetic is float32 on exactly upcast inputs, with
// the operations in the documented order, so the Python executor (torch ops)
// produces the same bytes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "convert.h"

namespace gs {

// `allow_avx2` below is the caller's decision (Python: config.py reads
// GEMMA_STREAM_NO_AVX2; the native driver reads it itself); the AVX2 loops run
// only when it is true and the CPU has AVX2. Both give the same bytes.

// Quantizes `rows` rows of K elements (src contiguous, f16/bf16/f32).
// Writes q int8 [rows, K] and scale [rows] in scale_dtype. `scratch` holds K
// floats. Returns the index of the first row holding a NaN/Inf, or -1.
int64_t quantize_int8_rows(const void* src, DType src_dtype, int64_t rows, int64_t K,
                           int8_t* q, void* scale, DType scale_dtype, float* scratch, bool allow_avx2);

// Asymmetric int4 per row and group of G along K. Writes q uint8 [rows, K/2]
// (even k in the low nibble), scale and zero [rows, K/G] in scale_dtype.
// `scratch` holds K floats. Returns the first non-finite row (which may be
// partly written), or -1.
int64_t quantize_int4_rows(const void* src, DType src_dtype, int64_t rows, int64_t K, int64_t G,
                           uint8_t* q, void* scale, void* zero, DType scale_dtype, float* scratch,
                           bool allow_avx2);

// "avx2" when the hand-vectorized quantizer loops run with this `allow_avx2`
// (x86-64 with AVX2), else "portable".
const char* quant_kernels(bool allow_avx2);

}  // namespace gs
