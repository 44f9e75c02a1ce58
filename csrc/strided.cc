#include "strided.h"

#include <algorithm>
#include <numeric>

namespace gs {

StridedLayout make_strided(const CopyJob& job, std::size_t chunk_elems) {
  const std::size_t nd = job.shape.size();
  std::vector<std::size_t> order(nd);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return job.src_strides[a] > job.src_strides[b]; });
  std::vector<int64_t> dst_strides(nd);
  int64_t step = 1;
  for (std::size_t d = nd; d-- > 0;) { dst_strides[d] = step; step *= job.shape[d]; }
  StridedLayout L;
  for (std::size_t i : order) {
    L.shape.push_back(job.shape[i]);
    L.src_strides.push_back(job.src_strides[i]);
    L.dst_strides.push_back(dst_strides[i]);
  }
  // smallest split such that dims [split, nd) span at most one chunk
  int split = static_cast<int>(nd);
  int64_t span = 1;
  // block_rows caps the outermost dim's indices per block: never one block over all of it
  const int min_split = job.block_rows > 0 && nd > 0 ? 1 : 0;
  while (split > min_split) {
    const int64_t wider = span + (L.shape[split - 1] - 1) * L.src_strides[split - 1];
    if (static_cast<std::size_t>(wider) > chunk_elems) break;
    span = wider;
    --split;
  }
  L.split = split;
  L.inner_span = span;
  if (split > 0) {
    const int64_t stride = std::max<int64_t>(L.src_strides[split - 1], 1);
    const int64_t fit = (static_cast<int64_t>(chunk_elems) - span) / stride + 1;
    L.group = std::max<int64_t>(1, std::min(fit, L.shape[split - 1]));
    if (job.block_rows > 0 && split == 1) L.group = std::min(L.group, job.block_rows);
    L.groups = (L.shape[split - 1] + L.group - 1) / L.group;
    for (int d = 0; d < split - 1; ++d) L.outer *= L.shape[d];
  }
  return L;
}

void scatter(const char* src, DType sd, char* dst, DType dd, const StridedLayout& L, int first_dim,
             const std::vector<int64_t>& extent) {
  const std::size_t nd = L.shape.size();
  const std::size_t si = itemsize(sd), di = itemsize(dd);
  std::vector<int64_t> idx(nd, 0);
  const bool inner_runs = nd > 0 && L.src_strides[nd - 1] == 1 && L.dst_strides[nd - 1] == 1;
  const int64_t run = inner_runs ? extent[nd - 1] : 1;
  const int last_loop = inner_runs ? static_cast<int>(nd) - 1 : static_cast<int>(nd);
  while (true) {
    int64_t so = 0, doff = 0;
    for (std::size_t d = static_cast<std::size_t>(first_dim); d < nd; ++d) {
      so += idx[d] * L.src_strides[d];
      doff += idx[d] * L.dst_strides[d];
    }
    convert(src + so * static_cast<int64_t>(si), sd, dst + doff * static_cast<int64_t>(di), dd,
            static_cast<std::size_t>(run));
    if (dd == DType::Bool) normalize_bool(dst + doff * static_cast<int64_t>(di), static_cast<std::size_t>(run));
    int d = last_loop - 1;
    while (d >= first_dim) {
      if (++idx[static_cast<std::size_t>(d)] < extent[static_cast<std::size_t>(d)]) break;
      idx[static_cast<std::size_t>(d)] = 0;
      --d;
    }
    if (d < first_dim) return;
  }
}

}  // namespace gs
