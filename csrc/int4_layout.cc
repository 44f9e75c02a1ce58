// The int4 repack between gemma_stream's stored layout and torch's CPU kernel layout (int4_layout.h).
#include "int4_layout.h"

#include <cstring>
#include <vector>

namespace gs {
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
