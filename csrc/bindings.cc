// pybind11 only: Python job tuples -> C++ CopyJob structs, GIL released while copying.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <thread>

#include "convert.h"
#include "executor.h"
#include "file.h"
#include "quant.h"

namespace py = pybind11;

namespace {

gs::DType to_dtype(int code) {
  if (!gs::dtype_valid(code)) throw gs::JobError("unknown dtype code " + std::to_string(code));
  return static_cast<gs::DType>(code);
}

// (op, file, src_offset, src_dtype, shape, src_strides, dst_ptr, dst_dtype,
//  scale_ptr, zero_ptr, scale_dtype, group_size, name, first_row)
using JobTuple = std::tuple<int, int, uint64_t, int, std::vector<int64_t>, std::vector<int64_t>, uintptr_t, int,
                            uintptr_t, uintptr_t, int, int64_t, std::string, int64_t>;

gs::CopyJob to_job(const JobTuple& t) {
  gs::CopyJob job;
  const int op = std::get<0>(t);
  if (op < 0 || op > 2) throw gs::JobError("unknown op code " + std::to_string(op));
  job.op = static_cast<gs::Op>(op);
  job.file = std::get<1>(t);
  job.src_offset = std::get<2>(t);
  job.src_dtype = to_dtype(std::get<3>(t));
  job.shape = std::get<4>(t);
  job.src_strides = std::get<5>(t);
  job.dst = reinterpret_cast<void*>(std::get<6>(t));
  job.dst_dtype = to_dtype(std::get<7>(t));
  job.scale = reinterpret_cast<void*>(std::get<8>(t));
  job.zero = reinterpret_cast<void*>(std::get<9>(t));
  job.scale_dtype = to_dtype(std::get<10>(t));
  job.group_size = std::get<11>(t);
  job.name = std::get<12>(t);
  job.first_row = std::get<13>(t);
  return job;
}

// (st_dev, st_ino, st_size, st_mtime_ns) of each validated file, or an empty list
using IdentityTuple = std::tuple<uint64_t, uint64_t, uint64_t, int64_t>;

py::tuple run(const std::vector<std::string>& files, const std::vector<JobTuple>& job_tuples, int threads,
              std::size_t chunk_bytes, bool drop_cache, const py::object& progress,
              const std::vector<IdentityTuple>& identities) {
  std::vector<gs::CopyJob> jobs;
  jobs.reserve(job_tuples.size());
  for (const auto& t : job_tuples) jobs.push_back(to_job(t));
  gs::Options options;
  options.threads = threads;
  options.chunk_bytes = chunk_bytes;
  options.drop_cache = drop_cache;
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
  m.def("run", &run, py::arg("files"), py::arg("jobs"), py::arg("threads"), py::arg("chunk_bytes"),
        py::arg("drop_cache"), py::arg("progress"), py::arg("identities") = std::vector<IdentityTuple>(),
        "Run copy jobs; returns (bytes_read, completed).");
  // In-place int4 repack between the stored layout and torch's CPU kernel layout
  // (quant.h); QuantLinear calls it once per layer after a load.
  m.def("int4_to_cpu_kernel_layout", [](uintptr_t data, int64_t rows, int64_t K, int64_t block, bool halves) {
    py::gil_scoped_release release;
    return gs::int4_to_cpu_kernel_layout(reinterpret_cast<uint8_t*>(data), rows, K, block, halves);
  });
  m.def("int4_from_cpu_kernel_layout", [](uintptr_t data, int64_t rows, int64_t K, int64_t block, bool halves) {
    py::gil_scoped_release release;
    return gs::int4_from_cpu_kernel_layout(reinterpret_cast<uint8_t*>(data), rows, K, block, halves);
  });
  m.def("quant_kernels", &gs::quant_kernels, "Which quantizer loops run here: \"avx2\" or \"portable\".");
  m.def("cache_drop", []() { return gs::cache_drop_name(gs::cache_drop_support()); },
        "How this OS drops pages from the page cache: \"fadvise_dontneed\", \"f_nocache\" or \"none\".");
  m.def("hardware_threads", []() { return static_cast<int>(std::thread::hardware_concurrency()); });
}
