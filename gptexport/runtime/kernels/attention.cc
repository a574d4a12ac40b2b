// CachedAttention: the attention of one layer of our exported graph as one op (onnxgraph.py swaps it
// in for the explicit causal-mask subgraph), reading only the keys each row can see.
//
//   y[b, t, h, :] = softmax_j(scale * q[b, h, t, :] . K_j) @ V_j    over the visible keys j:
//     the past keys j < past_length[b] (of the P slots of k_past/v_past; the slots beyond are
//     another row's longer history or room to grow), then the new keys 0..t (causal).
//   q, k_new, v_new: float [B, nh, T, hd]; k_past, v_past: float [B, nh, P, hd]; past_length: int64
//   [B]; scale: float, one value. y: float [B, T, nh, hd] (the graph's Transpose after the
//   attention, taken in: the next Reshape joins the heads).
//   Optional k_present, v_present: float [B, nh, P, hd], the past with each row's new keys (values)
//   written at positions past_length[b] .. past_length[b] + T - 1 (those that fit in P). Bound to
//   the past's own buffer (ONNX Runtime's GroupQueryAttention does the same, its
//   past_present_share_buffer), only the new positions are written: the cache is appended to in
//   place, by the thread that has just read that row and head, instead of by a copy after the run.
//   Optional segments: int64 [S, 2], (cache row, tokens) each: a flat batch. q, k_new, v_new are
//   then [1, nh, T, hd], T the segments' tokens in order, each segment the next tokens of its own
//   cache row (rows of k_past/v_past [R, nh, P, hd], past_length [R]; no row twice), so one
//   forward carries the decode tokens of some rows and prompt chunks of others (the scheduler's
//   mixed step). Without segments (or with none), segment b is row b's T tokens.
//
// What the graph computes instead: scores against all P slots and all T new keys, masked with -inf
// (Where), concatenated, softmaxed, sliced and multiplied by both value tensors: every step reads
// and writes (B, nh, T, P + T) scores in ~15 nodes per layer, and a row's attention costs the
// capacity of the cache (its longest row) whatever its own length. Here a row costs its own length,
// masked slots are never read (a NaN left in one cannot reach the output), and softmax is exact
// over the visible keys: exp(s - max) / sum, the masked terms of the graph's softmax being 0.
// Work is split over (row, head, block of queries) with ONNX Runtime's intra-op pool.
// Paths: AVX2+FMA (dot products, exp and the value sums 8 lanes at a time; for head sizes of 8 to 64
// in steps of 8, the query and its sums held in registers) or plain C++.

#include "kernels.h"

#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace {

using namespace gptexport_kernels;

constexpr int64_t kQueriesPerTask = 16;  // a prefill's queries per task: causal rows grow, so many small tasks

struct Shapes {
  int64_t B = 0, heads = 0, T = 0, P = 0, hd = 0;  // B: q's batch
};

// A run of queries of one cache row: q's batch `qb`, its tokens offset .. offset + count - 1.
struct Segment {
  int64_t qb, offset, count, row;
};

struct Task {  // a block of queries t0..t1-1 of one segment and head
  int64_t segment, head, t0, t1;
};

struct Keys;
// one query against its keys, for one head size (QueryAvx2Fixed), or none
using QueryFn = void (*)(const float* q, const Keys& keys, float scale, float* scores, float* out);

struct Call {
  Shapes s;
  const float *q, *k_new, *v_new, *k_past, *v_past;
  const int64_t* past_length;
  float scale;
  float* y;
  float *k_present = nullptr, *v_present = nullptr;  // where the new keys and values go, if anywhere
  QueryFn fixed = nullptr;
  std::vector<Segment> segments;
  std::vector<Task> tasks;
};

// ---- one query against its visible keys: scores, softmax, weighted values ----

// The keys (and values) query t of (b, h) sees: `past` rows of the past buffer, then t + 1 new ones.
struct Keys {
  const float *k_past, *v_past, *k_new, *v_new;
  int64_t past, count, hd;
  const float* key(int64_t j) const { return j < past ? k_past + j * hd : k_new + (j - past) * hd; }
  const float* value(int64_t j) const { return j < past ? v_past + j * hd : v_new + (j - past) * hd; }
};

float DotGeneric(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

void QueryGeneric(const float* q, const Keys& keys, int64_t hd, float scale, float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t j = 0; j < keys.count; ++j) {
    scores[j] = DotGeneric(q, keys.key(j), hd) * scale;
    top = std::max(top, scores[j]);
  }
  float sum = 0.0f;
  for (int64_t d = 0; d < hd; ++d) out[d] = 0.0f;
  for (int64_t j = 0; j < keys.count; ++j) {
    const float p = std::exp(scores[j] - top);
    sum += p;
    const float* v = keys.value(j);
    for (int64_t d = 0; d < hd; ++d) out[d] += p * v[d];
  }
  for (int64_t d = 0; d < hd; ++d) out[d] /= sum;
}

__attribute__((target("avx2,fma"))) inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

__attribute__((target("avx2,fma"))) inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

__attribute__((target("avx2,fma"))) inline float DotAvx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  for (; d + 8 <= n; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
  float sum = HorizontalSum(_mm256_add_ps(acc0, acc1));
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// e^x for x <= 0 (a score minus the row's largest), 8 at a time: x = n ln2 + r, |r| <= ln2 / 2,
// e^r by Cephes' degree-6 polynomial (relative error ~1e-7), times 2^n through the exponent bits;
// below -87 (e^x < 1.2e-38, nothing beside the largest term's 1) it returns 0.
__attribute__((target("avx2,fma"))) inline __m256 ExpAvx2(__m256 x) {
  const __m256 too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(too_small, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// scores[0..count) <- e^(score - top), 8 at a time (the tail after the last whole 8 in scalar); their sum
__attribute__((target("avx2,fma"))) float ExpInPlace(float* scores, int64_t count, float top) {
  __m256 sums = _mm256_setzero_ps();
  const __m256 top8 = _mm256_set1_ps(top);
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m256 p = ExpAvx2(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top8));
    _mm256_storeu_ps(scores + j, p);
    sums = _mm256_add_ps(sums, p);
  }
  float sum = HorizontalSum(sums);
  for (; j < count; ++j) {
    scores[j] = std::exp(scores[j] - top);
    sum += scores[j];
  }
  return sum;
}

__attribute__((target("avx2,fma"))) void QueryAvx2(const float* q, const Keys& keys, int64_t hd, float scale,
                                                    float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t j = 0; j < keys.count; ++j) {
    scores[j] = DotAvx2(q, keys.key(j), hd) * scale;
    top = std::max(top, scores[j]);
  }
  const float sum = ExpInPlace(scores, keys.count, top);
  for (int64_t d = 0; d < hd; ++d) out[d] = 0.0f;
  for (int64_t j = 0; j < keys.count; ++j) {
    const float* v = keys.value(j);
    const __m256 p = _mm256_set1_ps(scores[j]);
    int64_t d = 0;
    for (; d + 8 <= hd; d += 8)
      _mm256_storeu_ps(out + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + d), _mm256_loadu_ps(out + d)));
    for (; d < hd; ++d) out[d] += scores[j] * v[d];
  }
  const float inverse = 1.0f / sum;
  for (int64_t d = 0; d < hd; ++d) out[d] *= inverse;
}

// The same for a head size of 8V (V <= 8: GPT-2's 64 is V = 8): the query and the output sums stay
// in registers (the loop above keeps `out` in memory: a load and a store per 8 lanes per key, and
// its dot product ends each key in a chain of horizontal adds); the dot products of 8 keys end
// together, as one vector of 8 scores. Same visible keys, same exponentials.
// q . key in 8 lanes of partial sums, for a head size of 8V
template <int V>
__attribute__((target("avx2,fma"))) inline __m256 PartialDot(const __m256 (&qv)[V], const float* key) {
  __m256 a = _mm256_mul_ps(qv[0], _mm256_loadu_ps(key));
  for (int i = 1; i < V; ++i) a = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(key + 8 * i), a);
  return a;
}

template <int V>
__attribute__((target("avx2,fma"))) void QueryAvx2Fixed(const float* q, const Keys& keys, float scale, float* scores,
                                                         float* out) {
  __m256 qv[V];
  for (int i = 0; i < V; ++i) qv[i] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * i), _mm256_set1_ps(scale));
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= keys.count; j += 8) {
    __m256 dot[8];
    for (int k = 0; k < 8; ++k) dot[k] = PartialDot<V>(qv, keys.key(j + k));
    // 8 vectors of 8 partial sums -> the 8 sums, lane k = key j + k
    const __m256 h01 = _mm256_hadd_ps(dot[0], dot[1]), h23 = _mm256_hadd_ps(dot[2], dot[3]);
    const __m256 h45 = _mm256_hadd_ps(dot[4], dot[5]), h67 = _mm256_hadd_ps(dot[6], dot[7]);
    const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
    _mm256_storeu_ps(scores + j, sums);
    top8 = _mm256_max_ps(top8, sums);
  }
  float top = HorizontalMax(top8);
  for (; j < keys.count; ++j) {
    scores[j] = HorizontalSum(PartialDot<V>(qv, keys.key(j)));
    top = std::max(top, scores[j]);
  }
  const float sum = ExpInPlace(scores, keys.count, top);
  __m256 acc[V];
  for (int i = 0; i < V; ++i) acc[i] = _mm256_setzero_ps();
  for (j = 0; j < keys.count; ++j) {
    const float* v = keys.value(j);
    const __m256 p = _mm256_set1_ps(scores[j]);
    for (int i = 0; i < V; ++i) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * i), acc[i]);
  }
  const __m256 inverse = _mm256_set1_ps(1.0f / sum);
  for (int i = 0; i < V; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc[i], inverse));
}

QueryFn FixedQuery(int64_t hd) {
  if (hd % 8 != 0 || hd > 64) return nullptr;
  static const QueryFn by_vectors[9] = {nullptr,           QueryAvx2Fixed<1>, QueryAvx2Fixed<2>,
                                        QueryAvx2Fixed<3>, QueryAvx2Fixed<4>, QueryAvx2Fixed<5>,
                                        QueryAvx2Fixed<6>, QueryAvx2Fixed<7>, QueryAvx2Fixed<8>};
  return by_vectors[hd / 8];
}

// ---- one task: a block of queries of one (row, head) ----

void RunTask(const Call& call, const Task& task, float* scores) {
  const Shapes& s = call.s;
  const Segment& seg = call.segments[task.segment];
  const int64_t h = task.head;
  const int64_t qh = (seg.qb * s.heads + h) * s.T + seg.offset;  // the segment's first query of head h
  const int64_t ph = (seg.row * s.heads + h) * s.P;              // its row's first past position of head h
  Keys keys;
  keys.hd = s.hd;
  keys.past = std::min(std::max<int64_t>(call.past_length[seg.row], 0), s.P);
  keys.k_past = call.k_past + ph * s.hd;
  keys.v_past = call.v_past + ph * s.hd;
  keys.k_new = call.k_new + qh * s.hd;
  keys.v_new = call.v_new + qh * s.hd;
  if (call.k_present != nullptr) {  // this block's new keys and values into the present, where they fit
    for (int64_t t = task.t0; t < std::min(task.t1, s.P - keys.past); ++t) {
      std::memcpy(call.k_present + (ph + keys.past + t) * s.hd, keys.k_new + t * s.hd, s.hd * sizeof(float));
      std::memcpy(call.v_present + (ph + keys.past + t) * s.hd, keys.v_new + t * s.hd, s.hd * sizeof(float));
    }
  }
  for (int64_t t = task.t0; t < task.t1; ++t) {
    keys.count = keys.past + t + 1;
    const float* q = call.q + (qh + t) * s.hd;
    float* out = call.y + ((seg.qb * s.T + seg.offset + t) * s.heads + h) * s.hd;
    if (call.fixed != nullptr)
      call.fixed(q, keys, call.scale, scores, out);
    else if (g_use_avx2)
      QueryAvx2(q, keys, s.hd, call.scale, scores, out);
    else
      QueryGeneric(q, keys, s.hd, call.scale, scores, out);
  }
}

// ---- the ONNX Runtime kernel ----

OrtStatus* Input(OrtKernelContext* context, size_t index, std::vector<int64_t>* shape, const void** data) {
  const OrtValue* value = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, index, &value));
  if (value == nullptr) return Error("CachedAttention: input " + std::to_string(index) + " is missing");
  RETURN_IF_ERROR(TensorShape(value, shape));
  void* mutable_data = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &mutable_data));
  *data = mutable_data;
  return nullptr;
}

// The segments of a call: given (flat batch), or row b's T tokens for each b. Checked: rows in
// range and distinct (a row's new positions are written while its own queries read its past),
// tokens adding up to T.
OrtStatus* Segments(OrtKernelContext* context, int64_t rows, Call* call) {
  const Shapes& s = call->s;
  size_t inputs = 0;
  RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(context, &inputs));
  const OrtValue* value = nullptr;
  if (inputs > 7) RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, 7, &value));
  std::vector<int64_t> shape;
  if (value != nullptr) RETURN_IF_ERROR(TensorShape(value, &shape));
  if (value == nullptr || Count(shape) == 0) {
    if (rows != s.B) return Error("CachedAttention: k_past and v_past must have q's batch without segments");
    for (int64_t b = 0; b < s.B; ++b) call->segments.push_back({b, 0, s.T, b});
    return nullptr;
  }
  if (shape.size() != 2 || shape[1] != 2 || s.B != 1)
    return Error("CachedAttention: segments must be [S, 2] (row, tokens), with q of batch 1");
  void* data = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  const int64_t* pairs = static_cast<const int64_t*>(data);
  std::vector<bool> seen(static_cast<size_t>(rows), false);
  int64_t offset = 0;
  for (int64_t i = 0; i < shape[0]; ++i) {
    const int64_t row = pairs[2 * i], count = pairs[2 * i + 1];
    if (row < 0 || row >= rows || seen[row] || count < 1 || count > s.T - offset)
      return Error("CachedAttention: segment " + std::to_string(i) + " (row " + std::to_string(row) + ", " +
                   std::to_string(count) + " tokens) is outside the rows, a row twice, or past q's tokens");
    seen[row] = true;
    call->segments.push_back({0, offset, count, row});
    offset += count;
  }
  if (offset != s.T) return Error("CachedAttention: the segments' tokens do not add up to q's");
  return nullptr;
}

OrtStatus* Compute(OrtKernelContext* context) {
  std::vector<int64_t> shape[7];
  const void* data[7];
  for (size_t i = 0; i < 7; ++i) RETURN_IF_ERROR(Input(context, i, &shape[i], &data[i]));
  Call call;
  Shapes& s = call.s;
  if (shape[0].size() != 4 || shape[3].size() != 4)
    return Error("CachedAttention: q must be [B, heads, T, head_dim], k_past [rows, heads, P, head_dim]");
  s.B = shape[0][0], s.heads = shape[0][1], s.T = shape[0][2], s.hd = shape[0][3];
  s.P = shape[3][2];
  const int64_t rows = shape[3][0];
  const std::vector<int64_t> q_shape = shape[0], past = {rows, s.heads, s.P, s.hd};
  if (shape[1] != q_shape || shape[2] != q_shape || shape[3] != past || shape[4] != past ||
      shape[5] != std::vector<int64_t>{rows} || Count(shape[6]) != 1)
    return Error("CachedAttention: k_new, v_new must be shaped as q [B, heads, T, head_dim], k_past and v_past "
                 "[rows, heads, P, head_dim], past_length [rows], scale one value");
  RETURN_IF_ERROR(Segments(context, rows, &call));
  call.q = static_cast<const float*>(data[0]);
  call.k_new = static_cast<const float*>(data[1]);
  call.v_new = static_cast<const float*>(data[2]);
  call.k_past = static_cast<const float*>(data[3]);
  call.v_past = static_cast<const float*>(data[4]);
  call.past_length = static_cast<const int64_t*>(data[5]);
  call.scale = *static_cast<const float*>(data[6]);
  call.fixed = g_use_avx2 ? FixedQuery(s.hd) : nullptr;
  const std::vector<int64_t> y_shape = {s.B, s.T, s.heads, s.hd};
  OrtValue* Y = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, y_shape.data(), y_shape.size(), &Y));
  size_t outputs = 0;
  RETURN_IF_ERROR(g_api->KernelContext_GetOutputCount(context, &outputs));
  for (size_t i = 0; outputs == 3 && i < 2; ++i) {
    OrtValue* value = nullptr;
    RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 1 + i, past.data(), past.size(), &value));
    if (Count(past) == 0) continue;  // no room: an empty present (every new key falls outside P)
    void* out = nullptr;
    RETURN_IF_ERROR(g_api->GetTensorMutableData(value, &out));
    float* present = static_cast<float*>(out);
    const float* from = i == 0 ? call.k_past : call.v_past;
    // bound elsewhere than the past (ONNX Runtime's own allocation): the past first, then the new
    if (present != from) std::memcpy(present, from, Count(past) * sizeof(float));
    (i == 0 ? call.k_present : call.v_present) = present;
  }
  if (Count(y_shape) == 0) return nullptr;
  void* y_data = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(Y, &y_data));
  call.y = static_cast<float*>(y_data);

  // each segment's queries in blocks, for every head; one score per visible key of a query (at most
  // P + the longest segment), in a buffer each pool thread keeps for the next calls: not
  // tasks x (P + T) floats per call (50 MB for 16 cropped windows of 1024)
  int64_t longest = 0;
  for (size_t i = 0; i < call.segments.size(); ++i) {
    const Segment& seg = call.segments[i];
    longest = std::max(longest, seg.count);
    for (int64_t h = 0; h < s.heads; ++h)
      for (int64_t t0 = 0; t0 < seg.count; t0 += kQueriesPerTask)
        call.tasks.push_back({static_cast<int64_t>(i), h, t0, std::min(seg.count, t0 + kQueriesPerTask)});
  }
  struct Job {
    const Call* call;
    size_t width;
    std::atomic<bool> out_of_memory{false};
  } job{&call, static_cast<size_t>(s.P + longest)};
  const auto run = [](void* data, size_t task) {
    Job& j = *static_cast<Job*>(data);
    thread_local std::vector<float> scores;
    try {
      if (scores.size() < j.width) scores.resize(j.width);
    } catch (const std::bad_alloc&) {  // never let it cross into ONNX Runtime's pool
      j.out_of_memory = true;
      return;
    }
    RunTask(*j.call, j.call->tasks[task], scores.data());
  };
  if (call.tasks.size() == 1)
    run(&job, 0);
  else if (!call.tasks.empty())
    RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(context, run, call.tasks.size(), 0, &job));
  return job.out_of_memory ? Error("CachedAttention: out of memory for the scores") : nullptr;
}

const OpSpec kCachedAttention = {
    "CachedAttention", 8, 7,  // q, k_new, v_new, k_past, v_past, past_length, scale[, segments]
    [](size_t i) { return i == 5 || i == 7 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; },
    [](const OrtKernelInfo*, void** kernel) -> OrtStatus* {
      *kernel = nullptr;  // nothing to keep: every input arrives with each call
      return nullptr;
    },
    [](void*, OrtKernelContext* context) { return Compute(context); },
    [](void*) {},
    3, 1,  // y[, k_present, v_present]
};

}  // namespace

const gptexport_kernels::OpSpec& gptexport_kernels::CachedAttentionSpec() { return kCachedAttention; }
