// pybind11 only: the typed Job (gs::CopyJob) and the engine's entry points; the GIL is released while copying.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <thread>

#include "convert.h"
#include "executor.h"
#include "file.h"
#include "int4_layout.h"
#include "quant.h"
#include "read_ranges.h"

namespace py = pybind11;

namespace {

gs::DType to_dtype(int code, const char* field) {
  if (!gs::dtype_valid(code)) throw gs::JobError(std::string("unknown ") + field + " code " + std::to_string(code));
  return static_cast<gs::DType>(code);
}

// _native.JobBatch(...): a batch of copy jobs as one column per CopyJob field
// (executor.h), named and typed. executors/native.py fills the columns in one
// pass over its jobs and one call converts them all. A bound object per job
// was measured slower than the old 14-field tuple: 2.4 us to build one from
// positional arguments, 5-8 us from keywords (benchmarks/NOTES.md, "Per-job cost").
struct JobBatch {
  std::vector<int> op, file, src_dtype, dst_dtype, scale_dtype;
  std::vector<uint64_t> src_offset;
  std::vector<std::vector<int64_t>> shape, src_strides;  // src_strides: [] = C-contiguous
  std::vector<uintptr_t> dst, scale, zero;               // addresses; 0 = none
  std::vector<int64_t> group_size, first_row, block_rows;
  std::vector<std::string> name;

  std::size_t size() const { return op.size(); }

  // The engine's jobs; JobError when a column has the wrong length or a code is unknown.
  std::vector<gs::CopyJob> jobs() const {
    const std::size_t n = size();
    const std::size_t lengths[] = {file.size(), src_dtype.size(), dst_dtype.size(), scale_dtype.size(),
                                   src_offset.size(), shape.size(), src_strides.size(), dst.size(), scale.size(),
                                   zero.size(), group_size.size(), first_row.size(), name.size(), block_rows.size()};
    for (std::size_t len : lengths)
      if (len != n) throw gs::JobError("JobBatch columns differ in length");
    std::vector<gs::CopyJob> out(n);
    for (std::size_t i = 0; i < n; ++i) {
      gs::CopyJob& job = out[i];
      if (op[i] < 0 || op[i] > 2) throw gs::JobError("unknown op code " + std::to_string(op[i]));
      job.op = static_cast<gs::Op>(op[i]);
      job.file = file[i];
      job.src_offset = src_offset[i];
      job.src_dtype = to_dtype(src_dtype[i], "src_dtype");
      job.shape = shape[i];
      job.src_strides = src_strides[i];
      job.dst = reinterpret_cast<void*>(dst[i]);
      job.dst_dtype = to_dtype(dst_dtype[i], "dst_dtype");
      job.scale = reinterpret_cast<void*>(scale[i]);
      job.zero = reinterpret_cast<void*>(zero[i]);
      job.scale_dtype = to_dtype(scale_dtype[i], "scale_dtype");
      job.group_size = group_size[i];
      job.name = name[i];
      job.first_row = first_row[i];
      if (block_rows[i] < 0) throw gs::JobError("negative block_rows");
      job.block_rows = block_rows[i];
    }
    return out;
  }
};

void bind_job_batch(py::module_& m) {
  py::class_<JobBatch>(m, "JobBatch", "Copy jobs, one column (list) per field; see _native.pyi.")
      .def(py::init([](std::vector<int> op, std::vector<int> file, std::vector<uint64_t> src_offset,
                       std::vector<int> src_dtype, std::vector<std::vector<int64_t>> shape,
                       std::vector<std::vector<int64_t>> src_strides, std::vector<uintptr_t> dst,
                       std::vector<int> dst_dtype, std::vector<uintptr_t> scale, std::vector<uintptr_t> zero,
                       std::vector<int> scale_dtype, std::vector<int64_t> group_size, std::vector<std::string> name,
                       std::vector<int64_t> first_row, std::vector<int64_t> block_rows) {
             return JobBatch{std::move(op), std::move(file), std::move(src_dtype), std::move(dst_dtype),
                             std::move(scale_dtype), std::move(src_offset), std::move(shape), std::move(src_strides),
                             std::move(dst), std::move(scale), std::move(zero), std::move(group_size),
                             std::move(first_row), std::move(block_rows), std::move(name)};
           }),
           py::kw_only(), py::arg("op"), py::arg("file"), py::arg("src_offset"), py::arg("src_dtype"), py::arg("shape"),
           py::arg("src_strides"), py::arg("dst"), py::arg("dst_dtype"), py::arg("scale"), py::arg("zero"),
           py::arg("scale_dtype"), py::arg("group_size"), py::arg("name"), py::arg("first_row"),
           py::arg("block_rows"))
      .def("__len__", &JobBatch::size)
      .def_readonly("op", &JobBatch::op)
      .def_readonly("file", &JobBatch::file)
      .def_readonly("src_offset", &JobBatch::src_offset)
      .def_readonly("src_dtype", &JobBatch::src_dtype)
      .def_readonly("shape", &JobBatch::shape)
      .def_readonly("src_strides", &JobBatch::src_strides)
      .def_readonly("dst", &JobBatch::dst)
      .def_readonly("dst_dtype", &JobBatch::dst_dtype)
      .def_readonly("scale", &JobBatch::scale)
      .def_readonly("zero", &JobBatch::zero)
      .def_readonly("scale_dtype", &JobBatch::scale_dtype)
      .def_readonly("group_size", &JobBatch::group_size)
      .def_readonly("name", &JobBatch::name)
      .def_readonly("first_row", &JobBatch::first_row)
      .def_readonly("block_rows", &JobBatch::block_rows);
  m.attr("OPS") = py::dict(py::arg("copy") = static_cast<int>(gs::Op::Copy),
                           py::arg("int8") = static_cast<int>(gs::Op::QuantInt8),
                           py::arg("int4") = static_cast<int>(gs::Op::QuantInt4));
}

// (name, code, itemsize, convertible) for every dtype the engine knows: the
// tests compare it with python/gemma_stream/dtypes.py.
std::vector<std::tuple<std::string, int, std::size_t, bool>> dtype_table() {
  std::vector<std::tuple<std::string, int, std::size_t, bool>> out;
  for (int code = 0; gs::dtype_valid(code); ++code) {
    const auto d = static_cast<gs::DType>(code);
    out.emplace_back(gs::dtype_name(d), code, gs::itemsize(d), gs::can_convert(d, gs::DType::F32));
  }
  return out;
}

// (st_dev, st_ino, st_size, st_mtime_ns) of each validated file, or an empty list
using IdentityTuple = std::tuple<uint64_t, uint64_t, uint64_t, int64_t>;

py::tuple run(const std::vector<std::string>& files, const JobBatch& batch, int threads,
              std::size_t chunk_bytes, bool drop_cache, const py::object& progress,
              const std::vector<IdentityTuple>& identities, bool allow_avx2) {
  const std::vector<gs::CopyJob> jobs = batch.jobs();
  gs::Options options;
  options.threads = threads;
  options.chunk_bytes = chunk_bytes;
  options.drop_cache = drop_cache;
  options.allow_avx2 = allow_avx2;
  for (const auto& id : identities)
    options.identities.push_back({std::get<0>(id), std::get<1>(id), std::get<2>(id), std::get<3>(id)});
  // Called on this (the calling) thread only, with the GIL taken back briefly.
  auto on_progress = [&progress](uint64_t done) -> bool {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (progress.is_none()) return true;
    py::object verdict = progress(done);
    return verdict.is_none() || verdict.cast<bool>();
  };
  gs::RunResult result;
  {
    py::gil_scoped_release release;
    result = gs::run_jobs(files, jobs, options, on_progress);
  }
  return py::make_tuple(result.bytes_read, result.completed);
}

// read_ranges(path, offsets, lengths, threads, identity=None) -> (bytes, [bytes read per range]):
// the ranges back to back in one bytes object, filled with the GIL released (read_ranges.h).
py::tuple read_ranges(const std::string& path, const std::vector<uint64_t>& offsets,
                      const std::vector<uint64_t>& lengths, int threads, const std::optional<IdentityTuple>& identity) {
  uint64_t total = 0;
  for (uint64_t n : lengths)
    if (!gs::checked_add_u64(total, n, &total) || total > (uint64_t(1) << 40))
      throw gs::JobError("read_ranges: more than 1 TiB asked for");
  py::bytes buffer(nullptr, static_cast<std::size_t>(total));   // not shared with anyone until returned
  char* out = PyBytes_AS_STRING(buffer.ptr());
  gs::FileIdentity expected;
  if (identity) expected = {std::get<0>(*identity), std::get<1>(*identity), std::get<2>(*identity),
                            std::get<3>(*identity)};
  std::vector<uint64_t> got;
  {
    py::gil_scoped_release release;
    got = gs::read_ranges(path, identity ? &expected : nullptr, offsets, lengths, threads, out);
  }
  return py::make_tuple(buffer, got);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "gemma_stream's C++ copy engine (no torch dependency)";
  py::register_exception<gs::JobError>(m, "JobError", PyExc_ValueError);
  py::register_exception<gs::IoError>(m, "IoError", PyExc_OSError);
  // DataError(message, path, tensor, row): the facts travel as args, not inside the text
  static py::exception<gs::DataError> data_error(m, "DataError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const gs::DataError& e) {
      py::object row = e.row >= 0 ? py::object(py::int_(e.row)) : py::object(py::none());
      PyErr_SetObject(data_error.ptr(), py::make_tuple(e.what(), e.path, e.tensor, row).ptr());
    }
  });
  bind_job_batch(m);
  m.def("run", &run, py::arg("files"), py::arg("jobs"), py::arg("threads"), py::arg("chunk_bytes"),
        py::arg("drop_cache"), py::arg("progress"), py::arg("identities") = std::vector<IdentityTuple>(),
        py::arg("allow_avx2") = true, "Run copy jobs; returns (bytes_read, completed).");
  m.def("read_ranges", &read_ranges, py::arg("path"), py::arg("offsets"), py::arg("lengths"), py::arg("threads"),
        py::arg("identity") = py::none(),
        "Read many byte ranges of one file, back to back, without the GIL; returns (bytes, bytes read per range).");
  py::class_<gs::BackgroundAdvice>(m, "BackgroundAdvice",
                                   "Asks for many byte ranges of one file (posix_fadvise WILLNEED) on a thread of "
                                   "its own; wait() joins it. A hint: failures are ignored.")
      .def(py::init<std::string, std::vector<uint64_t>, std::vector<uint64_t>>(), py::arg("path"),
           py::arg("offsets"), py::arg("lengths"))
      .def("wait", &gs::BackgroundAdvice::wait, py::call_guard<py::gil_scoped_release>(),
           "Block, without the GIL, until every range has been asked for.");
  m.def("dtype_table", &dtype_table, "(name, code, itemsize, convertible) of every dtype code the engine knows.");
  m.attr("PAGE_BYTES") = gs::kPageBytes;
  m.attr("FOLIO_BYTES") = gs::kFolioBytes;
  // In-place int4 repack between the stored layout and torch's CPU kernel layout
  // (int4_layout.h); QuantLinear calls it once per layer after a load.
  m.def("int4_to_cpu_kernel_layout", [](uintptr_t data, int64_t rows, int64_t K, int64_t block, bool halves) {
    py::gil_scoped_release release;
    return gs::int4_to_cpu_kernel_layout(reinterpret_cast<uint8_t*>(data), rows, K, block, halves);
  });
  m.def("int4_from_cpu_kernel_layout", [](uintptr_t data, int64_t rows, int64_t K, int64_t block, bool halves) {
    py::gil_scoped_release release;
    return gs::int4_from_cpu_kernel_layout(reinterpret_cast<uint8_t*>(data), rows, K, block, halves);
  });
  m.def("quant_kernels", &gs::quant_kernels, py::arg("allow_avx2"),
        "Which quantizer loops run here with this allow_avx2: \"avx2\" or \"portable\".");
  m.def("cache_drop", []() { return gs::cache_drop_name(gs::cache_drop_support()); },
        "How this OS drops pages from the page cache: \"fadvise_dontneed\", \"f_nocache\" or \"none\".");
  m.def("hardware_threads", []() { return static_cast<int>(std::thread::hardware_concurrency()); });
}
