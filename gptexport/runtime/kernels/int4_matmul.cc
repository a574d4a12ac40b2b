// gptexport's ONNX Runtime custom-op library (this file registers it; Int8MatMul is in
// int8_matmul.cc): Int4MatMul, a drop-in for com.microsoft MatMulNBits with 4-bit symmetric
// weights in blocks of 32 (what `gptexport quantize --int4` writes), tuned for decode: few
// activation rows, many weight columns.
//
//   Y[M, N] = A[M, K] @ dequant(B)[K, N] (+ bias[N])
//   B: uint8 [N, K/32, 16], byte j of block b holds k = 32b+2j in its low nibble, 32b+2j+1 in its high;
//   a weight is (nibble - 8) * scales[n * K/32 + b].
//
// How it computes (why it is faster than MatMulNBits on small M):
// - B is repacked once, when ONNX Runtime creates the kernel, into groups of 8 output columns: per
//   block of 32 k, 128 bytes of nibbles then the group's 8 scales in fp16. In the 128 bytes, each 32-byte
//   load holds two "tiles" (low and high nibbles); a tile is 4 consecutive k of all 8 columns,
//   column-major (byte 4c+i = column c, k = 4t+i), so one maddubs against 4 activation bytes
//   broadcast to every lane gives each column's partial sum in its own lane: no horizontal sums,
//   and the 8 columns' scales multiply as one vector.
// - Each activation row is quantized to int8 once per call, per block of 32 (scale = max|a|/127),
//   with the block's sum kept: sum((q-8)*a) = sum(q*a) - 8*sum(a), so nibbles stay unsigned (0..15)
//   as maddubs wants them and the -8 costs one subtraction per block and row.
// - The microkernel unpacks a group's block once and applies it to up to 4 rows (MatMulNBits' x86
//   kernel serves 2): at batch 8 a weight byte is read from memory twice, not four times.
//   8 maddubs results are summed in int16 before widening: 8 * 2 * 15 * 127 = 30480 < 32767.
// - Work is split over groups of columns with ONNX Runtime's own intra-op thread pool
//   (KernelContext_ParallelFor), so the session's thread count holds.
// Paths: AVX2+FMA+F16C when the CPU has them (checked with CPUID at load), else plain C++ on the same
// layout; GPTEXPORT_KERNELS_ISA=generic forces the plain path (the tests run both).

#include "kernels.h"

#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

// kernels.h's shared helpers are defined here; int8_matmul.cc uses them.
namespace gptexport_kernels {

const OrtApi* g_api = nullptr;
bool g_use_avx2 = false;
bool g_use_vnni = false;

OrtStatus* Error(const std::string& msg) { return g_api->CreateStatus(ORT_FAIL, msg.c_str()); }

int64_t Count(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  return count;
}

OrtStatus* TensorShape(const OrtValue* value, std::vector<int64_t>* shape) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = g_api->GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    shape->resize(rank);
    status = g_api->GetDimensions(info, shape->data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

OrtStatus* ConstantInput(const OrtKernelInfo* info, size_t index, const char* op, const char* name,
                         const OrtValue** out) {
  int is_constant = 0;
  RETURN_IF_ERROR(g_api->KernelInfoGetConstantInput_tensor(info, index, &is_constant, out));
  if (!is_constant || *out == nullptr) return Error(std::string(op) + ": input " + name + " must be an initializer");
  return nullptr;
}

struct BoundKernel {  // what ONNX Runtime holds for one node: the op's spec and its kernel
  const OpSpec* spec;
  void* kernel = nullptr;
};

struct OpTable : OrtCustomOp {
  const OpSpec& spec;

  static const OpSpec& Of(const OrtCustomOp* op) { return static_cast<const OpTable*>(op)->spec; }

  explicit OpTable(const OpSpec& op_spec) : OrtCustomOp(), spec(op_spec) {
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp* op) { return Of(op).name; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return "CPUExecutionProvider"; };
    GetInputTypeCount = [](const OrtCustomOp* op) { return Of(op).inputs; };
    GetInputType = [](const OrtCustomOp* op, size_t i) { return Of(op).input_type(i); };
    GetInputCharacteristic = [](const OrtCustomOp* op, size_t i) {
      return i >= Of(op).required ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetOutputTypeCount = [](const OrtCustomOp* op) { return Of(op).outputs; };
    GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    GetOutputCharacteristic = [](const OrtCustomOp* op, size_t i) {
      return i >= Of(op).required_outputs ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    CreateKernelV2 = [](const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** out) -> OrtStatusPtr {
      try {  // the repacked weights' allocation
        std::unique_ptr<BoundKernel> bound(new BoundKernel{&Of(op)});
        RETURN_IF_ERROR(bound->spec->create(info, &bound->kernel));
        *out = bound.release();
        return nullptr;
      } catch (const std::exception& e) {
        return Error(std::string(Of(op).name) + ": " + e.what());
      }
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* context) -> OrtStatusPtr {
      const BoundKernel& bound = *static_cast<BoundKernel*>(kernel);
      try {
        return bound.spec->compute(bound.kernel, context);
      } catch (const std::exception& e) {  // std::bad_alloc: never let it cross into ONNX Runtime
        return Error(std::string(bound.spec->name) + ": " + e.what());
      }
    };
    KernelDestroy = [](void* kernel) {
      auto* bound = static_cast<BoundKernel*>(kernel);
      if (bound->kernel != nullptr) bound->spec->destroy(bound->kernel);
      delete bound;
    };
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return 1; };
  }
};

}  // namespace gptexport_kernels

namespace {

using namespace gptexport_kernels;

constexpr int kBlock = 32;          // k per scale
constexpr int kGroup = 8;           // output columns per repacked group
constexpr int kBlockBytes = 128;    // nibbles of one group's block: 8 columns x 32 k / 2
constexpr int kMaxRows = 4;         // activation rows served by one unpacked weight block
constexpr int kTaskWork = 512;      // row-blocks (32 inputs x 8 columns x 1 row) per pool task, ~2 us
constexpr int kPrefetchBlocks = 16;  // how far ahead the weight stream is prefetched (prefetches never fault)

struct PackedBlock {  // one block of 32 k of one group of 8 columns: 144 bytes
  uint8_t q[kBlockBytes];
  uint16_t scale[kGroup];  // fp16, in units of Int4Weights::scale_unit
};

// One activation row, quantized: per block its int8 values, scale and 8 * sum of the values.
struct QuantRow {
  const int8_t* q;
  const float* scale;
  const int32_t* offset;
};

struct Int4Weights {
  int64_t K = 0, N = 0, blocks = 0, groups = 0;
  float scale_unit = 1.0f;  // what a packed fp16 scale of 1 stands for (folded into the rows' scales)
  std::vector<PackedBlock> packed;  // [groups][blocks]
};

// ---- fp16 scales ----
// At one row the weights stream from memory once per token, so their bytes set the pace: scales in
// fp16 take a block from 160 to 144 bytes (a pass over the 768 x 50257 layout: 1.11x faster, fastest
// of 12 interleaved runs). Scales are stored relative to scale_unit = the largest |scale| / 2^15, so
// none overflows fp16 and none smaller than 2^-39 of the largest leaves fp16's normal range; their
// relative rounding is at most 2^-11. Converted in plain C++ (the same bits on every path).

uint16_t ToHalf(float f) {  // round to nearest, ties to even; |f| <= 32768 here
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  x &= 0x7fffffff;
  if (x >= 0x477ff000) return sign | 0x7c00;  // rounds past 65504: infinity
  if (x < 0x38800000) {                        // below 2^-14: a subnormal, in units of 2^-24
    float magnitude;
    std::memcpy(&magnitude, &x, sizeof(magnitude));
    return sign | static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.0f));
  }
  uint32_t h = (x - 0x38000000) >> 13;  // exponent rebased 127 -> 15, 23 -> 10 mantissa bits
  const uint32_t rest = x & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // a carry into the exponent is still right
  return sign | static_cast<uint16_t>(h);
}

float FromHalf(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exponent = (h >> 10) & 31, mantissa = h & 0x3ff;
  if (exponent == 0) return (sign ? -1.0f : 1.0f) * static_cast<float>(mantissa) * 5.9604645e-8f;  // 2^-24
  const uint32_t x = sign | (exponent == 31 ? 0x7f800000 | (mantissa << 13) : ((exponent + 112) << 23) | (mantissa << 13));
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}

// ---- repacking ----

inline int Nibble(const uint8_t* B, int64_t blocks, int64_t n, int64_t k) {
  const uint8_t byte = B[(n * blocks + k / kBlock) * (kBlock / 2) + (k % kBlock) / 2];
  return (k & 1) ? (byte >> 4) : (byte & 15);
}

void Repack(const uint8_t* B, const float* scales, Int4Weights* w) {
  w->packed.assign(static_cast<size_t>(w->groups * w->blocks), PackedBlock{});
  float largest = 0.0f;
  for (int64_t i = 0; i < w->N * w->blocks; ++i) largest = std::max(largest, std::fabs(scales[i]));
  w->scale_unit = largest > 0.0f && std::isfinite(largest) ? largest / 32768.0f : 1.0f;
  for (int64_t g = 0; g < w->groups; ++g) {
    for (int64_t b = 0; b < w->blocks; ++b) {
      PackedBlock& out = w->packed[g * w->blocks + b];
      for (int c = 0; c < kGroup; ++c) {
        const int64_t n = g * kGroup + c;
        const bool real = n < w->N;  // the last group's missing columns stay 0 (scale 0)
        out.scale[c] = ToHalf(real ? scales[n * w->blocks + b] / w->scale_unit : 0.0f);
        for (int t = 0; t < kBlock / 4; ++t) {  // tile t: k = 4t .. 4t+3
          for (int i = 0; i < 4; ++i) {
            const int nib = real ? Nibble(B, w->blocks, n, b * kBlock + 4 * t + i) : 8;
            const int byte = (t / 2) * 32 + 4 * c + i;  // tile 2L in load L's low nibbles, 2L+1 in its high
            out.q[byte] |= static_cast<uint8_t>((t % 2) ? nib << 4 : nib);
          }
        }
      }
    }
  }
}

// ---- activation quantization ----

// One whole block of 32 as the loop below computes it (the same float operations: the largest |a|,
// 127 / it, a * that rounded to nearest even), 8 lanes at a time: at batch 8 the plain loop cost
// ~18 us per matmul call, ~1 ms of a GPT-2 forward. Returns amax; q and *sum as the loop's.
__attribute__((target("avx2"))) float QuantizeBlockAvx2(const float* a, int8_t* q, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], top = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(a + 8 * i);
    top = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), top);  // a NaN loses, as in std::max(amax, |a|)
  }
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  const float amax = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
  const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  __m256i n[4];
  for (int i = 0; i < 4; ++i)
    n[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i sums = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  *sum = _mm_cvtsi128_si32(s);
  // |values| <= 127: the packs never saturate; they interleave 4-value groups per 128-bit lane,
  // which the permutation puts back in order
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return amax;
}

void QuantizeRow(const float* a, int64_t K, int64_t blocks, int8_t* q, float* scale, int32_t* offset) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * kBlock, k1 = std::min<int64_t>(K, k0 + kBlock);
    if (g_use_avx2 && k1 - k0 == kBlock) {
      int32_t sum = 0;
      scale[b] = QuantizeBlockAvx2(a + k0, q + k0, &sum) / 127.0f;
      offset[b] = 8 * sum;
      continue;
    }
    float amax = 0.0f;
    for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(a[k]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    for (int64_t k = k0; k < k0 + kBlock; ++k) {
      const int v = k < k1 ? static_cast<int>(std::nearbyint(a[k] * inv)) : 0;
      q[k] = static_cast<int8_t>(v);
      sum += v;
    }
    scale[b] = amax / 127.0f;
    offset[b] = 8 * sum;
  }
}

// ---- microkernels: rows x one group of 8 columns, out[r][0..8) ----

void GroupGeneric(const PackedBlock* wb, int64_t blocks, const QuantRow* rows, int nrows, float (*out)[kGroup]) {
  for (int r = 0; r < nrows; ++r) {
    float acc[kGroup] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      const int8_t* a = rows[r].q + b * kBlock;
      for (int c = 0; c < kGroup; ++c) {
        int32_t dot = 0;
        for (int t = 0; t < kBlock / 4; ++t) {
          for (int i = 0; i < 4; ++i) {
            const uint8_t byte = wb[b].q[(t / 2) * 32 + 4 * c + i];
            dot += ((t % 2) ? byte >> 4 : byte & 15) * a[4 * t + i];
          }
        }
        acc[c] += static_cast<float>(dot - rows[r].offset[b]) * (FromHalf(wb[b].scale[c]) * rows[r].scale[b]);
      }
    }
    std::memcpy(out[r], acc, sizeof(acc));
  }
}

template <int R>
__attribute__((target("avx2,fma,f16c"))) void GroupAvx2(const PackedBlock* wb, int64_t blocks, const QuantRow* rows,
                                                   float (*out)[kGroup]) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const PackedBlock& blk = wb[b];
    // the weights stream from memory once per token: ask for them 16 blocks (2.3 KB) ahead, which
    // the hardware prefetcher alone did not (768x50257 at one row: 1.4-1.9x faster, measured)
    const char* ahead = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(wb + b) + kPrefetchBlocks * sizeof(PackedBlock));
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    _mm_prefetch(ahead + 128, _MM_HINT_T0);
    __m256i w[8];
    for (int L = 0; L < 4; ++L) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.q + 32 * L));
      w[2 * L] = _mm256_and_si256(packed, low);
      w[2 * L + 1] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
    }
    const __m256 wscale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.scale)));
    for (int r = 0; r < R; ++r) {
      const int8_t* a = rows[r].q + b * kBlock;
      __m256i p[8];
      for (int t = 0; t < 8; ++t) {
        int32_t four;  // activations k = 4t .. 4t+3, broadcast to every column's lane
        std::memcpy(&four, a + 4 * t, sizeof(four));
        p[t] = _mm256_maddubs_epi16(w[t], _mm256_set1_epi32(four));
      }
      // summed as a tree (depth 3, not a chain of 7), in int16: at most 8 * 3810 = 30480
      const __m256i s = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])),
                                         _mm256_add_epi16(_mm256_add_epi16(p[4], p[5]), _mm256_add_epi16(p[6], p[7])));
      const __m256i dot = _mm256_sub_epi32(_mm256_madd_epi16(s, ones), _mm256_set1_epi32(rows[r].offset[b]));
      const __m256 scale = _mm256_mul_ps(wscale, _mm256_set1_ps(rows[r].scale[b]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r], acc[r]);
}

void Group(const PackedBlock* wb, int64_t blocks, const QuantRow* rows, int nrows, float (*out)[kGroup]) {
  if (!g_use_avx2) return GroupGeneric(wb, blocks, rows, nrows, out);
  switch (nrows) {
    case 1: return GroupAvx2<1>(wb, blocks, rows, out);
    case 2: return GroupAvx2<2>(wb, blocks, rows, out);
    case 3: return GroupAvx2<3>(wb, blocks, rows, out);
    default: return GroupAvx2<4>(wb, blocks, rows, out);
  }
}

// ---- one call: every row against the column groups of one task ----

void RunGroups(const Int4Weights& w, const std::vector<QuantRow>& rows, const float* bias, float* y,
               int64_t g0, int64_t g1) {
  const int64_t M = static_cast<int64_t>(rows.size());
  float tile[kMaxRows][kGroup];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t n0 = g * kGroup, width = std::min<int64_t>(kGroup, w.N - n0);
    for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
      const int nrows = static_cast<int>(std::min<int64_t>(kMaxRows, M - r0));
      Group(&w.packed[g * w.blocks], w.blocks, &rows[r0], nrows, tile);
      for (int r = 0; r < nrows; ++r) {
        float* dst = y + (r0 + r) * w.N + n0;
        for (int64_t c = 0; c < width; ++c) dst[c] = tile[r][c] + (bias ? bias[n0 + c] : 0.0f);
      }
    }
  }
}

// ---- the ONNX Runtime kernel ----

struct Int4MatMulKernel {
  Int4Weights w;
};

OrtStatus* Attribute(const OrtKernelInfo* info, const char* name, int64_t* out) {
  OrtStatus* status = g_api->KernelInfoGetAttribute_int64(info, name, out);
  if (status != nullptr) {
    g_api->ReleaseStatus(status);
    return Error(std::string("Int4MatMul: attribute ") + name + " is missing");
  }
  return nullptr;
}

OrtStatus* LoadWeights(const OrtKernelInfo* info, Int4MatMulKernel* kernel) {
  int64_t bits = 0, block = 0;
  Int4Weights& w = kernel->w;
  RETURN_IF_ERROR(Attribute(info, "K", &w.K));
  RETURN_IF_ERROR(Attribute(info, "N", &w.N));
  RETURN_IF_ERROR(Attribute(info, "bits", &bits));
  RETURN_IF_ERROR(Attribute(info, "block_size", &block));
  if (bits != 4 || block != kBlock || w.K <= 0 || w.N <= 0)
    return Error("Int4MatMul: takes bits=4, block_size=32 (got bits=" + std::to_string(bits) +
                 ", block_size=" + std::to_string(block) + ")");
  w.blocks = (w.K + kBlock - 1) / kBlock;
  w.groups = (w.N + kGroup - 1) / kGroup;
  const OrtValue *B = nullptr, *scales = nullptr;
  RETURN_IF_ERROR(ConstantInput(info, 1, "Int4MatMul", "B", &B));
  RETURN_IF_ERROR(ConstantInput(info, 2, "Int4MatMul", "scales", &scales));
  std::vector<int64_t> b_shape, s_shape;
  RETURN_IF_ERROR(TensorShape(B, &b_shape));
  RETURN_IF_ERROR(TensorShape(scales, &s_shape));
  if (b_shape != std::vector<int64_t>{w.N, w.blocks, kBlock / 2} || Count(s_shape) != w.N * w.blocks)
    return Error("Int4MatMul: B or scales do not have the shape K and N say");
  void *b_data = nullptr, *s_data = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(B), &b_data));
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(scales), &s_data));
  Repack(static_cast<const uint8_t*>(b_data), static_cast<const float*>(s_data), &w);
  return nullptr;
}

OrtStatus* Compute(const Int4MatMulKernel& kernel, OrtKernelContext* context) {
  const Int4Weights& w = kernel.w;
  const OrtValue* A = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, 0, &A));
  std::vector<int64_t> shape;
  RETURN_IF_ERROR(TensorShape(A, &shape));
  if (shape.empty() || shape.back() != w.K)
    return Error("Int4MatMul: A's last dimension is not K=" + std::to_string(w.K));
  const int64_t M = Count(shape) / w.K;  // the rows: every dimension but the last (K, checked > 0)
  size_t inputs = 0;
  RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(context, &inputs));
  const OrtValue* bias_value = nullptr;
  if (inputs > 3) RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, 3, &bias_value));
  shape.back() = w.N;
  OrtValue* Y = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &Y));
  if (M == 0) return nullptr;
  void *a_data = nullptr, *y_data = nullptr, *bias_data = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(A), &a_data));
  RETURN_IF_ERROR(g_api->GetTensorMutableData(Y, &y_data));
  if (bias_value != nullptr) RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(bias_value), &bias_data));

  // the quantized rows live for this call only: calls may run concurrently on one kernel
  const int64_t padded = w.blocks * kBlock;
  std::vector<int8_t> q(static_cast<size_t>(M * padded));
  std::vector<float> scale(static_cast<size_t>(M * w.blocks));
  std::vector<int32_t> offset(static_cast<size_t>(M * w.blocks));
  std::vector<QuantRow> rows(static_cast<size_t>(M));
  const float* a = static_cast<const float*>(a_data);
  for (int64_t r = 0; r < M; ++r) {
    QuantizeRow(a + r * w.K, w.K, w.blocks, &q[r * padded], &scale[r * w.blocks], &offset[r * w.blocks]);
    for (int64_t b = 0; b < w.blocks; ++b) scale[r * w.blocks + b] *= w.scale_unit;  // the weights' unit, once per row
    rows[r] = QuantRow{&q[r * padded], &scale[r * w.blocks], &offset[r * w.blocks]};
  }
  const float* bias = static_cast<const float*>(bias_data);
  float* y = static_cast<float*>(y_data);
  return ForGroups(context, w.groups, M * w.blocks, kTaskWork,
                   [&](int64_t g0, int64_t g1) { RunGroups(w, rows, bias, y, g0, g1); });
}

// ---- the custom op's C table ----

OrtStatus* CreateKernel(const OrtKernelInfo* info, void** out) {
  std::unique_ptr<Int4MatMulKernel> kernel(new Int4MatMulKernel());  // std::bad_alloc: OpTable reports it
  RETURN_IF_ERROR(LoadWeights(info, kernel.get()));
  *out = kernel.release();
  return nullptr;
}

const OpSpec kInt4MatMul = {
    "Int4MatMul", 4, 3,  // A, B, scales[, bias]
    [](size_t i) { return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; },
    CreateKernel,
    [](void* kernel, OrtKernelContext* context) { return Compute(*static_cast<Int4MatMulKernel*>(kernel), context); },
    [](void* kernel) { delete static_cast<Int4MatMulKernel*>(kernel); },
};

// The path this CPU runs: "avx512vnni" (the AVX2 paths, and Int8MatMul on vpdpbusd: exact u8 x s8
// sums), "avx2" (AVX2 + FMA + F16C) or "generic". GPTEXPORT_KERNELS_ISA=avx2 leaves VNNI out,
// =generic both (the tests run each path the CPU has).
const char* ChooseIsa() {
  const char* given = std::getenv("GPTEXPORT_KERNELS_ISA");
  const std::string cap = given != nullptr ? given : "";
  __builtin_cpu_init();
  if (cap == "generic" ||
      !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
    return "generic";
  if (cap == "avx2" || !(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vnni")))
    return "avx2";
  return "avx512vnni";
}

}  // namespace

extern "C" {

// The path this process runs (ChooseIsa): the tests and the bench name it.
__attribute__((visibility("default"))) const char* GptexportKernelsIsa() { return ChooseIsa(); }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (g_api == nullptr) return nullptr;  // cannot even make a status: ONNX Runtime older than our headers
  const char* isa = ChooseIsa();
  g_use_avx2 = std::strcmp(isa, "generic") != 0;
  g_use_vnni = std::strcmp(isa, "avx512vnni") == 0;
  // the domain must outlive every session registered with it: it is never released (one small
  // object per registration)
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF_ERROR(g_api->CreateCustomOpDomain("gptexport", &domain));
  static OpTable int4_matmul(kInt4MatMul), int8_matmul(Int8MatMulSpec()), attention(CachedAttentionSpec());
  for (OpTable* op : {&int4_matmul, &int8_matmul, &attention}) RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, op));
  return g_api->AddCustomOpDomain(options, domain);
}

}  // extern "C"
