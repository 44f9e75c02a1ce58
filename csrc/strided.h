// Strided sources (a transposed or sliced checkpoint view): how the executor
// cuts one into blocks that each read one storage span, and the elementwise
// copy of a block from that span to the contiguous destination.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "convert.h"
#include "executor.h"

namespace gs {

// A strided source read block by block in storage order: dims are permuted by
// decreasing source stride; a block is a run of `group` indices of dim
// `split - 1` times all of dims [split, ndim), whose storage span fits a chunk.
struct StridedLayout {
  std::vector<int64_t> shape, src_strides, dst_strides;  // permuted
  int split = 0;           // first dim wholly inside a block
  int64_t group = 1;       // indices of dim split-1 per block
  int64_t groups = 1;      // blocks along dim split-1
  int64_t outer = 1;       // product of shape[0, split-1)
  int64_t inner_span = 1;  // elements spanned by dims [split, ndim)
};

// The layout of `job` (src_strides not empty) for blocks of at most
// `chunk_elems` elements of storage.
StridedLayout make_strided(const CopyJob& job, std::size_t chunk_elems);

// Copies (converting src dtype -> dst dtype) the block whose dims before
// `first_dim` are fixed by the caller and whose dims from `first_dim` on run
// over `extent`; `src` is the block's first element in the staged span.
void scatter(const char* src, DType sd, char* dst, DType dd, const StridedLayout& L, int first_dim,
             const std::vector<int64_t>& extent);

}  // namespace gs
