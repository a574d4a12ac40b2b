// Int8MatMul, in the same library as Int4MatMul (registered there): what ONNX Runtime's dynamic
// int8 quantization computes (`gptexport quantize --int8`: DynamicQuantizeLinear + MatMulInteger +
// Cast + Mul, and the bias Add), as one op tuned for decode.
//
//   Y[M, N] = dequant(A)[M, K] @ ((B[K, N] - b_zero_point[N]) * b_scale[N]) (+ bias[N])
//   B: int8 [K, N]; b_scale: float [N] or one; b_zero_point: int8 [N] or one.
//
// Activations: DynamicQuantizeLinear's own formula (uint8, asymmetric: scale = (max(0, max a) -
// min(0, min a)) / 255, zero point round(-min / scale), values round(a / scale) + zero point, ties
// to even), applied to each row rather than to the whole tensor. At one row (batch-1 decode) that
// is exactly the graph's quantization; with more rows each row gets a range no wider than the
// tensor's, and a row's result no longer depends on the other rows of its batch.
//
// How it computes:
// - B is repacked once, when ONNX Runtime creates the kernel, into groups of 8 output columns: per
//   pair of inputs k, 16 bytes, byte 2c+i = B[2p+i][column c]. One `vpmovsxbw` widens them to 8
//   lanes of two int16, and one `vpmaddwd` against the row's two activations broadcast to every
//   lane gives each column's partial sum in its own int32 lane: no horizontal sums, no saturation
//   (vpmaddubsw would saturate u8 x s8 pairs: 2 * 255 * 127 > 32767), exact int32 sums.
// - Each activation row is quantized once per call and kept as int16 (q - zero point, -255..255).
// - A group's widened weights serve up to 4 rows before the next load.
// - Work is split over groups of columns with ONNX Runtime's intra-op pool, as Int4MatMul's.
// Paths: AVX2 when the CPU has it (chosen with Int4MatMul's), else plain C++ on the same layout.
//
// With AVX-512 VNNI, another layout and microkernel: per 4 inputs, 64 bytes, byte 4c+i = B[k+i][c],
// one zmm of 16 columns; `vpdpbusd` multiplies the row's 4 quantized activations as unsigned bytes
// (q, 0..255, broadcast) by each column's 4 signed weights and adds the 4 products to the column's
// int32 lane without saturation: Σ q·b exact, one instruction per 64 products (the AVX2 path takes
// 5 vector instructions; on such a CPU ONNX Runtime's own path, on MLAS's VNNI GEMM, ran 2-5x that
// path at 4-8 rows).
// Σ (q - zp)·b = Σ q·b - zp·Σ b, with each column's Σ b kept from the repack. 8 rows per load.

#include "kernels.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <new>

namespace {

using namespace gptexport_kernels;

constexpr int kGroup = 16;           // output columns per repacked group: two vectors of 8
constexpr int kStep = 4;             // inputs per inner step: 64 bytes of a group, one cache line
constexpr int kAvx2Rows = 4;         // activation rows served by one load of weights: AVX2, generic
constexpr int kVnniRows = 8;         // and VNNI (32 zmm registers: 8 accumulators, no spills)
constexpr int kMaxRows = 8;
constexpr int kTaskWork = 4096;      // row-steps (8 inputs x 8 columns x 1 row) per pool task
constexpr int kPrefetchBytes = 2048;  // how far ahead the weight stream is prefetched

struct Int8Weights {
  int64_t K = 0, N = 0, padded = 0, groups = 0;  // padded: K rounded up to kStep
  std::vector<int8_t> packed;                    // [groups][padded / 2][16], or VNNI's [groups][padded / 4][16][4]
  std::vector<float> scale;                      // [groups * 16], 0 past N
  std::vector<int32_t> zero_point;               // [groups * 16]
  std::vector<int32_t> column_sum;               // [groups * 16]: Σ_k B[k][n], for VNNI's unsigned activations
  bool has_zero_point = false;
  bool vnni = false;                             // the layout: chosen when the kernel is made, kept
};

// One activation row, quantized: q - zero point per input (padded with 0), its scale and sum.
struct QuantRow {
  const int16_t* v;
  const uint8_t* q = nullptr;  // VNNI: q = v + zero point, 0..255 (padded with 0)
  float scale;
  int32_t sum;
  int32_t zero_point = 0;
};

// ---- repacking ----

// Where input k of column c (of 16) lies in a group: per pair of inputs 32 bytes, columns 0-7 then
// 8-15, two bytes (k even, k odd) per column.
inline int64_t PackedIndex(int64_t k, int64_t c) { return (k / 2) * 32 + (c / 8) * 16 + 2 * (c % 8) + (k % 2); }
// VNNI's: per 4 inputs 64 bytes, four bytes (k .. k+3) per column.
inline int64_t PackedIndexVnni(int64_t k, int64_t c) { return (k / 4) * 64 + 4 * c + (k % 4); }

void Repack(const int8_t* B, const float* scale, int64_t scale_count, const int8_t* zp, int64_t zp_count,
            Int8Weights* w) {
  w->packed.assign(static_cast<size_t>(w->groups * w->padded * kGroup), 0);
  w->scale.assign(static_cast<size_t>(w->groups * kGroup), 0.0f);
  w->zero_point.assign(static_cast<size_t>(w->groups * kGroup), 0);
  w->column_sum.assign(static_cast<size_t>(w->groups * kGroup), 0);
  for (int64_t n = 0; n < w->N; ++n) {
    w->scale[n] = scale[scale_count == 1 ? 0 : n];
    w->zero_point[n] = zp[zp_count == 1 ? 0 : n];
    w->has_zero_point |= w->zero_point[n] != 0;
    int8_t* group = &w->packed[(n / kGroup) * w->padded * kGroup];
    const int64_t c = n % kGroup;
    for (int64_t k = 0; k < w->K; ++k) {
      group[w->vnni ? PackedIndexVnni(k, c) : PackedIndex(k, c)] = B[k * w->N + n];
      w->column_sum[n] += B[k * w->N + n];
    }
  }
}

// ---- activation quantization: DynamicQuantizeLinear's formula, per row ----

struct RowRange {
  float scale, zero_point;
};

// min and max of a[0..K) with 0 (a NaN is passed over, as std::min/max pass it over below)
__attribute__((target("avx2"))) int64_t RangeAvx2(const float* a, int64_t K, float* lo, float* hi) {
  __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 x = _mm256_loadu_ps(a + k);
    vlo = _mm256_min_ps(x, vlo);  // (x NaN: the second operand)
    vhi = _mm256_max_ps(x, vhi);
  }
  float l[8], h[8];
  _mm256_storeu_ps(l, vlo);
  _mm256_storeu_ps(h, vhi);
  for (int i = 0; i < 8; ++i) {
    *lo = std::min(*lo, l[i]);
    *hi = std::max(*hi, h[i]);
  }
  return k;
}

RowRange Range(const float* a, int64_t K) {
  float lo = 0.0f, hi = 0.0f;  // the range always holds 0, as DynamicQuantizeLinear's does
  for (int64_t k = g_use_avx2 ? RangeAvx2(a, K, &lo, &hi) : 0; k < K; ++k) {
    lo = std::min(lo, a[k]);
    hi = std::max(hi, a[k]);
  }
  const float scale = (hi - lo) / 255.0f;
  if (!(scale > 0.0f) || !std::isfinite(scale)) return {0.0f, 0.0f};
  return {scale, std::nearbyint(std::min(255.0f, std::max(0.0f, -lo / scale)))};
}

void QuantizeGeneric(const float* a, int64_t K, RowRange r, int16_t* v) {
  for (int64_t k = 0; k < K; ++k) {
    const float q = std::nearbyint(a[k] / r.scale) + r.zero_point;
    v[k] = static_cast<int16_t>(std::min(255.0f, std::max(0.0f, q)) - r.zero_point);
  }
}

// v = q - zero point (and with `u8`, q itself) for a[0..k), k the multiple of 8 it returns; their sum.
__attribute__((target("avx2"))) int64_t QuantizeAvx2(const float* a, int64_t K, RowRange r, int16_t* v,
                                                     uint8_t* u8, int32_t* sum) {
  const __m256 scale = _mm256_set1_ps(r.scale), zp = _mm256_set1_ps(r.zero_point);
  const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(255.0f);
  __m256i total = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {  // division and ties-to-even rounding, as the scalar path
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(a + k), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_add_ps(q, zp)));
    const __m256i i32 = _mm256_cvtps_epi32(_mm256_sub_ps(q, zp));
    total = _mm256_add_epi32(total, i32);
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(v + k), i16);
    if (u8 != nullptr) {  // 0..255: packs to int16 then unsigned bytes lose nothing
      const __m256i u32 = _mm256_cvtps_epi32(q);
      const __m128i u16 = _mm_packs_epi32(_mm256_castsi256_si128(u32), _mm256_extracti128_si256(u32, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(u8 + k), _mm_packus_epi16(u16, u16));
    }
  }
  int32_t lanes[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), total);
  for (int i = 0; i < 8; ++i) *sum += lanes[i];
  return k;
}

// One row: v = q - zero point (padded with 0), with `u8` also q (padded with 0); Σ v.
int32_t QuantizeRow(const float* a, int64_t K, int64_t padded, int16_t* v, uint8_t* u8, float* scale,
                    int32_t* zero_point) {
  const RowRange r = Range(a, K);
  *scale = r.scale;
  *zero_point = static_cast<int32_t>(r.zero_point);
  std::fill(v, v + padded, 0);
  if (u8 != nullptr) std::fill(u8, u8 + padded, 0);
  if (r.scale == 0.0f) return 0;
  int32_t sum = 0;
  const int64_t done = g_use_avx2 ? QuantizeAvx2(a, K, r, v, u8, &sum) : 0;
  QuantizeGeneric(a + done, K - done, r, v + done);
  for (int64_t k = done; k < K; ++k) {
    sum += v[k];
    if (u8 != nullptr) u8[k] = static_cast<uint8_t>(v[k] + *zero_point);
  }
  return sum;
}

// ---- microkernels: rows x one group of 8 columns, integer dot products out[r][0..8) ----

void GroupGeneric(const int8_t* wg, int64_t padded, const QuantRow* rows, int nrows, int32_t (*out)[kGroup]) {
  for (int r = 0; r < nrows; ++r) {
    for (int c = 0; c < kGroup; ++c) {
      int32_t dot = 0;
      for (int64_t k = 0; k < padded; ++k) dot += wg[PackedIndex(k, c)] * rows[r].v[k];
      out[r][c] = dot;
    }
  }
}

template <int R>
__attribute__((target("avx2"))) void GroupAvx2(const int8_t* wg, int64_t padded, const QuantRow* rows,
                                               int32_t (*out)[kGroup]) {
  __m256i lo[R], hi[R];  // columns 0-7 and 8-15 of each row
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  for (int64_t k = 0; k < padded; k += kStep) {
    const int8_t* line = wg + k * kGroup;  // 64 bytes: inputs k .. k+3 of the 16 columns
    _mm_prefetch(reinterpret_cast<const char*>(line) + kPrefetchBytes, _MM_HINT_T0);
    __m256i w[4];  // pair k (columns 0-7, 8-15), pair k+2 (columns 0-7, 8-15)
    for (int i = 0; i < 4; ++i) w[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(line + 16 * i)));
    for (int r = 0; r < R; ++r) {
      // activations k, k+1 and k+2, k+3 (32-bit words) broadcast to every column's lane straight
      // from memory (vbroadcastss: a load, no ALU work; set1 from a register cost two more
      // instructions each), each serving 16 columns
      const float* pair = reinterpret_cast<const float*>(rows[r].v + k);
      const __m256i a0 = _mm256_castps_si256(_mm256_broadcast_ss(pair));
      const __m256i a1 = _mm256_castps_si256(_mm256_broadcast_ss(pair + 1));
      lo[r] = _mm256_add_epi32(lo[r], _mm256_add_epi32(_mm256_madd_epi16(w[0], a0), _mm256_madd_epi16(w[2], a1)));
      hi[r] = _mm256_add_epi32(hi[r], _mm256_add_epi32(_mm256_madd_epi16(w[1], a0), _mm256_madd_epi16(w[3], a1)));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r]), lo[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + 8), hi[r]);
  }
}

template <int R>
__attribute__((target("avx2,avx512f,avx512bw,avx512vnni"))) void GroupVnni(
    const int8_t* wg, int64_t padded, const QuantRow* rows, const int32_t* column_sum, int32_t (*out)[kGroup]) {
  // with few rows a second chain of accumulators for odd steps: one chain waits on vpdpbusd's
  // latency (5 cycles), not its throughput
  constexpr int kChains = R <= 4 ? 2 : 1;
  __m512i acc[kChains][R];
  for (int c = 0; c < kChains; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < padded; k += kStep * kChains) {
    for (int c = 0; c < kChains && k + c * kStep < padded; ++c) {
      const int8_t* line = wg + (k + c * kStep) * kGroup;  // 64 bytes: 4 inputs of the 16 columns
      _mm_prefetch(reinterpret_cast<const char*>(line) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(line);
      for (int r = 0; r < R; ++r) {
        int32_t four;  // 4 activations, unsigned bytes, broadcast to every column's lane
        std::memcpy(&four, rows[r].q + k + c * kStep, sizeof four);
        acc[c][r] = _mm512_dpbusd_epi32(acc[c][r], _mm512_set1_epi32(four), w);
      }
    }
  }
  if constexpr (kChains == 2)
    for (int r = 0; r < R; ++r) acc[0][r] = _mm512_add_epi32(acc[0][r], acc[1][r]);
  const __m512i sums = _mm512_loadu_si512(column_sum);
  for (int r = 0; r < R; ++r)  // Σ (q - zp)·b = Σ q·b - zp·Σ b
    _mm512_storeu_si512(out[r], _mm512_sub_epi32(acc[0][r], _mm512_mullo_epi32(_mm512_set1_epi32(rows[r].zero_point), sums)));
}

// A row's 16 outputs from its integer dot products, as the scalar loop in RunGroups computes them
// (mul, mul, add: no fused multiply-add, so both round alike).
__attribute__((target("avx2,avx512f"))) void OutputsVnni(const int32_t* tile, const QuantRow& row, const int32_t* zero_point,
                                                         const float* scale, const float* bias, float* dst) {
  const __m512i dot = _mm512_sub_epi32(_mm512_loadu_si512(tile),
                                       _mm512_mullo_epi32(_mm512_loadu_si512(zero_point), _mm512_set1_epi32(row.sum)));
  const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(row.scale), _mm512_loadu_ps(scale));
  const __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), scales);
  // (+ 0 without a bias, as the scalar loop adds 0.0f: -0 becomes +0 alike)
  _mm512_storeu_ps(dst, _mm512_add_ps(y, bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps()));
}

// Integer dot products of `nrows` rows (at most kVnniRows on VNNI, else kAvx2Rows) against group g:
// out[r][0..16).
void Group(const Int8Weights& w, int64_t g, const QuantRow* rows, int nrows, int32_t (*out)[kGroup]) {
  const int8_t* wg = &w.packed[g * w.padded * kGroup];
  if (w.vnni) {
    const int32_t* sums = &w.column_sum[g * kGroup];
    switch (nrows) {
      case 1: return GroupVnni<1>(wg, w.padded, rows, sums, out);
      case 2: return GroupVnni<2>(wg, w.padded, rows, sums, out);
      case 3: return GroupVnni<3>(wg, w.padded, rows, sums, out);
      case 4: return GroupVnni<4>(wg, w.padded, rows, sums, out);
      case 5: return GroupVnni<5>(wg, w.padded, rows, sums, out);
      case 6: return GroupVnni<6>(wg, w.padded, rows, sums, out);
      case 7: return GroupVnni<7>(wg, w.padded, rows, sums, out);
      default: return GroupVnni<8>(wg, w.padded, rows, sums, out);
    }
  }
  if (!g_use_avx2) return GroupGeneric(wg, w.padded, rows, nrows, out);
  switch (nrows) {
    case 1: return GroupAvx2<1>(wg, w.padded, rows, out);
    case 2: return GroupAvx2<2>(wg, w.padded, rows, out);
    case 3: return GroupAvx2<3>(wg, w.padded, rows, out);
    default: return GroupAvx2<4>(wg, w.padded, rows, out);
  }
}

// ---- one call: every row against the column groups of one task ----

void RunGroups(const Int8Weights& w, const std::vector<QuantRow>& rows, const float* bias, float* y,
               int64_t g0, int64_t g1) {
  const int64_t M = static_cast<int64_t>(rows.size());
  int32_t tile[kMaxRows][kGroup];
  const int64_t per_load = w.vnni ? kVnniRows : kAvx2Rows;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t n0 = g * kGroup, width = std::min<int64_t>(kGroup, w.N - n0);
    for (int64_t r0 = 0; r0 < M; r0 += per_load) {
      const int nrows = static_cast<int>(std::min<int64_t>(per_load, M - r0));
      Group(w, g, &rows[r0], nrows, tile);
      for (int r = 0; r < nrows; ++r) {
        const QuantRow& row = rows[r0 + r];
        float* dst = y + (r0 + r) * w.N + n0;
        if (w.vnni && width == kGroup) {
          OutputsVnni(tile[r], row, &w.zero_point[n0], &w.scale[n0], bias ? bias + n0 : nullptr, dst);
          continue;
        }
        for (int64_t c = 0; c < width; ++c) {
          // Σ a·(b - zp) = Σ a·b - zp·Σ a; the scales multiply as the graph's Mul(a_scale, b_scale) does
          const int32_t dot = tile[r][c] - w.zero_point[n0 + c] * row.sum;
          dst[c] = static_cast<float>(dot) * (row.scale * w.scale[n0 + c]) + (bias ? bias[n0 + c] : 0.0f);
        }
      }
    }
  }
}

// ---- the ONNX Runtime kernel ----

OrtStatus* LoadWeights(const OrtKernelInfo* info, Int8Weights* w) {
  const OrtValue *B = nullptr, *scale = nullptr, *zp = nullptr;
  RETURN_IF_ERROR(ConstantInput(info, 1, "Int8MatMul", "B", &B));
  RETURN_IF_ERROR(ConstantInput(info, 2, "Int8MatMul", "b_scale", &scale));
  RETURN_IF_ERROR(ConstantInput(info, 3, "Int8MatMul", "b_zero_point", &zp));
  std::vector<int64_t> b_shape, s_shape, z_shape;
  RETURN_IF_ERROR(TensorShape(B, &b_shape));
  RETURN_IF_ERROR(TensorShape(scale, &s_shape));
  RETURN_IF_ERROR(TensorShape(zp, &z_shape));
  if (b_shape.size() != 2 || b_shape[0] <= 0 || b_shape[1] <= 0) return Error("Int8MatMul: B must be [K, N]");
  w->K = b_shape[0];
  w->N = b_shape[1];
  const int64_t s_count = Count(s_shape), z_count = Count(z_shape);
  if ((s_count != 1 && s_count != w->N) || (z_count != 1 && z_count != w->N))
    return Error("Int8MatMul: b_scale and b_zero_point must hold one value or one per column (N=" +
                 std::to_string(w->N) + ")");
  w->padded = (w->K + kStep - 1) / kStep * kStep;
  w->groups = (w->N + kGroup - 1) / kGroup;
  void *b_data = nullptr, *s_data = nullptr, *z_data = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(B), &b_data));
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(scale), &s_data));
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(zp), &z_data));
  Repack(static_cast<const int8_t*>(b_data), static_cast<const float*>(s_data), s_count,
         static_cast<const int8_t*>(z_data), z_count, w);
  return nullptr;
}

struct Inputs {
  std::vector<int64_t> shape;  // A's
  const float* a = nullptr;
  const float* bias = nullptr;
};

OrtStatus* ReadInputs(const Int8Weights& w, OrtKernelContext* context, Inputs* in) {
  const OrtValue* A = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, 0, &A));
  RETURN_IF_ERROR(TensorShape(A, &in->shape));
  if (in->shape.empty() || in->shape.back() != w.K)
    return Error("Int8MatMul: A's last dimension is not K=" + std::to_string(w.K));
  void* data = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(A), &data));
  in->a = static_cast<const float*>(data);
  size_t inputs = 0;
  RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(context, &inputs));
  const OrtValue* bias = nullptr;
  if (inputs > 4) RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, 4, &bias));
  if (bias != nullptr) {
    RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(bias), &data));
    in->bias = static_cast<const float*>(data);
  }
  return nullptr;
}

OrtStatus* Compute(const Int8Weights& w, OrtKernelContext* context) {
  Inputs in;
  RETURN_IF_ERROR(ReadInputs(w, context, &in));
  const int64_t M = Count(in.shape) / w.K;
  std::vector<int64_t> y_shape = in.shape;
  y_shape.back() = w.N;
  OrtValue* Y = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, y_shape.data(), y_shape.size(), &Y));
  if (M == 0) return nullptr;
  void* y_data = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(Y, &y_data));

  // the quantized rows live for this call only: calls may run concurrently on one kernel
  std::vector<int16_t> v(static_cast<size_t>(M * w.padded));
  std::vector<QuantRow> rows(static_cast<size_t>(M));
  std::vector<uint8_t> q(w.vnni ? static_cast<size_t>(M * w.padded) : 0);  // (padded with 0, as its weights)
  for (int64_t r = 0; r < M; ++r) {
    QuantRow& row = rows[r];
    int16_t* row_v = &v[r * w.padded];
    uint8_t* row_q = w.vnni ? &q[r * w.padded] : nullptr;
    row.v = row_v;
    row.q = row_q;
    row.sum = QuantizeRow(in.a + r * w.K, w.K, w.padded, row_v, row_q, &row.scale, &row.zero_point);
  }
  float* y = static_cast<float*>(y_data);
  return ForGroups(context, w.groups, M * (w.padded / kStep), kTaskWork,
                   [&](int64_t g0, int64_t g1) { RunGroups(w, rows, in.bias, y, g0, g1); });
}

// ---- the custom op's C table (int4_matmul.cc's OpTable) ----

OrtStatus* CreateKernel(const OrtKernelInfo* info, void** out) {
  std::unique_ptr<Int8Weights> w(new Int8Weights());  // std::bad_alloc: OpTable reports it
  w->vnni = g_use_vnni;
  RETURN_IF_ERROR(LoadWeights(info, w.get()));
  *out = w.release();
  return nullptr;
}

const OpSpec kInt8MatMul = {
    "Int8MatMul", 5, 4,  // A, B, b_scale, b_zero_point[, bias]
    [](size_t i) { return (i == 1 || i == 3) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; },
    CreateKernel,
    [](void* w, OrtKernelContext* context) { return Compute(*static_cast<Int8Weights*>(w), context); },
    [](void* w) { delete static_cast<Int8Weights*>(w); },
};

}  // namespace

const gptexport_kernels::OpSpec& gptexport_kernels::Int8MatMulSpec() { return kInt8MatMul; }
