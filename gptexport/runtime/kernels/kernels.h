// What our ops share: the error macro, ONNX Runtime's API and helpers (defined in
// int4_matmul.cc, which registers the library), the spec of an op's C table, and the split of a
// matmul's column groups over ONNX Runtime's intra-op pool.

#ifndef GPTEXPORT_KERNELS_H_
#define GPTEXPORT_KERNELS_H_

#include "onnxruntime_c_api.h"  // ONNX Runtime's C API (headers only: the API arrives in RegisterCustomOps)

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#define RETURN_IF_ERROR(expr)               \
  do {                                      \
    OrtStatus* _status = (expr);            \
    if (_status != nullptr) return _status; \
  } while (0)

namespace gptexport_kernels {

extern const OrtApi* g_api;
extern bool g_use_avx2;  // AVX2 + FMA + F16C, checked with CPUID when the library is registered
extern bool g_use_vnni;  // and AVX-512 F/BW/VNNI (Int8MatMul's vpdpbusd path), likewise

OrtStatus* Error(const std::string& msg);
int64_t Count(const std::vector<int64_t>& shape);  // elements of a shape
OrtStatus* TensorShape(const OrtValue* value, std::vector<int64_t>* shape);
OrtStatus* ConstantInput(const OrtKernelInfo* info, size_t index, const char* op, const char* name,
                         const OrtValue** out);

// What differs between our ops' C tables; int4_matmul.cc's OpTable does the rest (the CPU provider,
// float outputs, exceptions stopped at the C boundary).
struct OpSpec {
  const char* name;
  size_t inputs;
  size_t required;  // inputs 0..required-1 must be given, the rest are optional
  ONNXTensorElementDataType (*input_type)(size_t index);
  OrtStatus* (*create)(const OrtKernelInfo* info, void** kernel);  // may throw std::bad_alloc
  OrtStatus* (*compute)(void* kernel, OrtKernelContext* context);   // may throw std::bad_alloc
  void (*destroy)(void* kernel);
  size_t outputs = 1;           // all float
  size_t required_outputs = 1;  // outputs 0..required_outputs-1 must be taken, the rest are optional
};

const OpSpec& Int8MatMulSpec();       // int8_matmul.cc
const OpSpec& CachedAttentionSpec();  // attention.cc

// Runs run(g0, g1) over the column groups [0, groups) in tasks of about `task_work` units of work
// (`work_per_group` per group): enough tasks to balance the pool, each worth a thread hand-off; a
// small matmul runs on the calling thread alone. `run` must not throw (it runs on pool threads).
template <class Run>
OrtStatus* ForGroups(OrtKernelContext* context, int64_t groups, int64_t work_per_group, int64_t task_work,
                     const Run& run) {
  const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(groups, work_per_group * groups / task_work));
  struct Split {
    const Run* run;
    int64_t per_task, groups;
  } split{&run, (groups + wanted - 1) / wanted, groups};
  const auto task = [](void* data, size_t index) {
    const Split& s = *static_cast<const Split*>(data);
    const int64_t g0 = static_cast<int64_t>(index) * s.per_task;
    (*s.run)(g0, std::min(s.groups, g0 + s.per_task));
  };
  const int64_t tasks = (groups + split.per_task - 1) / split.per_task;
  if (tasks == 1) {
    task(&split, 0);
    return nullptr;
  }
  return g_api->KernelContext_ParallelFor(context, task, static_cast<size_t>(tasks), 0, &split);
}

}  // namespace gptexport_kernels

#endif  // GPTEXPORT_KERNELS_H_
