// In-place int4 repack between the stored layout of quant.h ([rows, K/2],
// even k in the low nibble; docs/FORMATS.md) and the one torch's CPU int4
// matmul kernel reads. QuantLinear calls it once per layer after a load, and
// before saving a state dict back to the stored layout.
#pragma once

#include <cstdint>

namespace gs {

// Converts int4 weights in place between the stored layout ([rows, K/2], even
// k in the low nibble) and the one torch's _convert_weight_to_int4pack_for_cpu
// produces: each block of `block` rows becomes [K, block/2] bytes with byte
// (k, j) = q[lo(j), k] | q[hi(j), k] << 4, (lo, hi) = (j, j + block/2) when
// `halves`, else (2j, 2j + 1); a last block of fewer rows always pairs (2j, 2j + 1).
// `data` starts on a block boundary. Temporaries: one block. Returns false (and
// touches nothing) unless rows, K and block are even and positive.
bool int4_to_cpu_kernel_layout(uint8_t* data, int64_t rows, int64_t K, int64_t block, bool halves);
bool int4_from_cpu_kernel_layout(uint8_t* data, int64_t rows, int64_t K, int64_t block, bool halves);

}  // namespace gs
