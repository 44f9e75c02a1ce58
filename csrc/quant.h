// Quantize-on-read kernels following docs/FORMATS.md ("gemma_stream
// quantized layouts"). All arithmetic is float32 on exactly upcast inputs, with
// the operations in the documented order, so the Python executor (torch ops)
// produces the same bytes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "convert.h"

namespace gs {

// Quantizes `rows` rows of K elements (src contiguous, f16/bf16/f32).
// Writes q int8 [rows, K] and scale [rows] in scale_dtype. `scratch` holds K
// floats. Returns the index of the first row holding a NaN/Inf, or -1.
int64_t quantize_int8_rows(const void* src, DType src_dtype, int64_t rows, int64_t K,
                           int8_t* q, void* scale, DType scale_dtype, float* scratch);

// Asymmetric int4 per row and group of G along K. Writes q uint8 [rows, K/2]
// (even k in the low nibble), scale and zero [rows, K/G] in scale_dtype.
// `scratch` holds K floats. Returns the first non-finite row (which may be
// partly written), or -1.
int64_t quantize_int4_rows(const void* src, DType src_dtype, int64_t rows, int64_t K, int64_t G,
                           uint8_t* q, void* scale, void* zero, DType scale_dtype, float* scratch);

// "avx2" when the hand-vectorized quantizer loops run (x86-64 with AVX2, unless
// GEMMA_STREAM_NO_AVX2 is set), else "portable". Both give the same bytes.
const char* quant_kernels();

// Converts int4 weights in place between the layout above ([rows, K/2], even k
// in the low nibble) and the one torch's _convert_weight_to_int4pack_for_cpu
// produces: each block of `block` rows becomes [K, block/2] bytes with byte
// (k, j) = q[lo(j), k] | q[hi(j), k] << 4, (lo, hi) = (j, j + block/2) when
// `halves`, else (2j, 2j + 1); a last block of fewer rows always pairs (2j, 2j + 1).
// `data` starts on a block boundary. Temporaries: one block. Returns false (and
// touches nothing) unless rows, K and block are even and positive.
bool int4_to_cpu_kernel_layout(uint8_t* data, int64_t rows, int64_t K, int64_t block, bool halves);
bool int4_from_cpu_kernel_layout(uint8_t* data, int64_t rows, int64_t K, int64_t block, bool halves);

}  // namespace gs
