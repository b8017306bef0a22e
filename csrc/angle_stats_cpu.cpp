// CPU angle_stats: fused single pass over the hidden states (DESIGN.md §1, §3).
//
// Work items are chunks of at most kChunk rows of one (sequence, segment); the chunk layout depends only on the
// offsets, never on the thread count, so results are bit-identical whatever OMP_NUM_THREADS is. Each item
// converts one row at a time into a float buffer (two rows per thread live in L1: current and previous),
// takes its norm, adds the unit vector into a float32 partial sum, and adds the adjacent dot u_t . u_{t+1}
// (the row after the chunk is read too, so pairs across chunk and segment borders inside [o_0, o_K) count
// once). A second parallel pass sums each segment's partials in chunk order. No [T, D] float32 temporary.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "check.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;

struct Segment {
  int64_t lo, hi, span_hi;  // absolute token range and the end of the sequence's covered span [o_0, o_K)
};

struct Chunk {
  int64_t seg, lo, hi;
};

inline float load_one(const float* p) { return *p; }
inline float load_one(const c10::Half* p) { return static_cast<float>(*p); }
inline float load_one(const c10::BFloat16* p) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[0]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Row -> float buffer in one sweep: returns the squared norm and, when `prev` is given, the dot with the previous
// row's buffer. The contiguous case is a plain loop the compiler vectorises (-fopenmp enables `omp simd`).
template <typename scalar_t>
inline float load_row(const scalar_t* row, int64_t stride_d, int64_t dim, float* out, const float* prev,
                      float* dot_prev) {
  float ss = 0.f, dp = 0.f;
  if (stride_d == 1 && prev != nullptr) {
#pragma omp simd reduction(+ : ss, dp)
    for (int64_t d = 0; d < dim; ++d) {
      const float v = load_one(row + d);
      out[d] = v;
      ss += v * v;
      dp += v * prev[d];
    }
  } else if (stride_d == 1) {
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < dim; ++d) {
      const float v = load_one(row + d);
      out[d] = v;
      ss += v * v;
    }
  } else {
    for (int64_t d = 0; d < dim; ++d) {
      const float v = load_one(row + d * stride_d);
      out[d] = v;
      ss += v * v;
      if (prev != nullptr) dp += v * prev[d];
    }
  }
  if (dot_prev != nullptr) *dot_prev = dp;
  return ss;
}

inline float inv_norm(float ss) { return 1.f / std::max(std::sqrt(ss), 1e-12f); }

template <typename scalar_t>
void run_chunk(const scalar_t* x, int64_t stride_t, int64_t stride_d, int64_t dim, const Segment& seg,
               const Chunk& ch, float* acc, float* sq_out, float* adj_out, std::vector<float>& cur,
               std::vector<float>& prev) {
  std::fill(acc, acc + dim, 0.f);
  float sq = 0.f, adj = 0.f, inv_prev = 0.f;
  for (int64_t t = ch.lo; t < ch.hi; ++t) {
    const bool has_prev = t > ch.lo;
    float dp = 0.f;
    const float ss = load_row(x + t * stride_t, stride_d, dim, cur.data(), has_prev ? prev.data() : nullptr, &dp);
    const float inv = inv_norm(ss);
    if (has_prev) adj += dp * inv * inv_prev;
    const float* c = cur.data();
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) acc[d] += c[d] * inv;
    sq += ss * inv * inv;  // ||u_t||^2: 1, or 0 for a zero row (NaN stays NaN)
    inv_prev = inv;
    std::swap(cur, prev);
  }
  if (ch.hi > ch.lo && ch.hi < seg.span_hi) {  // pair (last row of the chunk, next row)
    float dp = 0.f;
    const float inv = inv_norm(load_row(x + ch.hi * stride_t, stride_d, dim, cur.data(), prev.data(), &dp));
    adj += dp * inv * inv_prev;
  }
  *sq_out = sq;
  *adj_out = adj;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> angle_stats_cpu(const at::Tensor& hidden,
                                                                            const at::Tensor& cu_seqlens,
                                                                            const at::Tensor& seg_offsets) {
  TORCH_CHECK(hidden.dim() == 2, "hidden: expected [T, D]");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt && seg_offsets.scalar_type() == at::kInt,
              "cu_seqlens, seg_offsets: expected int32");
  const int64_t n_tokens = hidden.size(0), dim = hidden.size(1);
  const int64_t n_seq = seg_offsets.size(0), n_seg = seg_offsets.size(1) - 1;
  GAINRL_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() == n_seq + 1,
               "cu_seqlens: expected [B+1] = [" + std::to_string(n_seq + 1) +
                   "] entries for the B rows of seg_offsets, got " + std::to_string(cu_seqlens.numel()));
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor unit_sum = at::zeros({n_seq, n_seg, dim}, f32);
  at::Tensor count = at::empty({n_seq, n_seg}, hidden.options().dtype(at::kInt));
  at::Tensor sq_norm = at::zeros({n_seq, n_seg}, f32);
  at::Tensor adjacent = at::zeros({n_seq}, f32);
  if (n_seq == 0 || n_seg == 0) return {unit_sum, count, sq_norm, adjacent};

  // Segments, clamped into range (inputs are validated in Python; clamping keeps unvalidated calls in bounds).
  auto cu = cu_seqlens.contiguous();
  auto off = seg_offsets.contiguous();
  const int32_t* cu_p = cu.data_ptr<int32_t>();
  const int32_t* off_p = off.data_ptr<int32_t>();
  int32_t* count_p = count.data_ptr<int32_t>();
  std::vector<Segment> segs(n_seq * n_seg);
  std::vector<Chunk> chunks;
  std::vector<int64_t> chunk_start(n_seq * n_seg + 1, 0);
  for (int64_t b = 0; b < n_seq; ++b) {
    const int64_t s_lo = std::clamp<int64_t>(cu_p[b], 0, n_tokens);
    const int64_t s_hi = std::clamp<int64_t>(cu_p[b + 1], s_lo, n_tokens);
    const int32_t* o = off_p + b * (n_seg + 1);
    const int64_t span_hi = s_lo + std::clamp<int64_t>(o[n_seg], 0, s_hi - s_lo);
    for (int64_t k = 0; k < n_seg; ++k) {
      const int64_t g = b * n_seg + k;
      const int64_t lo = s_lo + std::clamp<int64_t>(o[k], 0, s_hi - s_lo);
      const int64_t hi = std::max(lo, s_lo + std::clamp<int64_t>(o[k + 1], 0, s_hi - s_lo));
      segs[g] = {lo, hi, std::max(span_hi, hi)};
      count_p[g] = static_cast<int32_t>(hi - lo);
      for (int64_t c = lo; c < hi; c += kChunk) chunks.push_back({g, c, std::min(c + kChunk, hi)});
      chunk_start[g + 1] = static_cast<int64_t>(chunks.size());
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  // Partials are torch allocations so memory profilers see them: [n_chunks, D + 2] float32 (sum, q, adjacent).
  at::Tensor part_buf = at::empty({n_chunks, dim + 2}, f32);
  float* part_base = part_buf.data_ptr<float>();

  auto run_all = [&](auto* x) {
    const int64_t st = hidden.stride(0), sd = hidden.stride(1);
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> cur(dim), prev(dim);
      for (int64_t i = begin; i < end; ++i) {
        const Chunk& ch = chunks[i];
        float* out = part_base + i * (dim + 2);
        run_chunk(x, st, sd, dim, segs[ch.seg], ch, out, out + dim, out + dim + 1, cur, prev);
      }
    });
  };
  switch (hidden.scalar_type()) {
    case at::kFloat: run_all(hidden.const_data_ptr<float>()); break;
    case at::kHalf: run_all(hidden.const_data_ptr<c10::Half>()); break;
    case at::kBFloat16: run_all(hidden.const_data_ptr<c10::BFloat16>()); break;
    default:
      GAINRL_CHECK(false, std::string("hidden: expected float16, bfloat16 or float32, got ") +
                              c10::toString(hidden.scalar_type()));
  }

  float* us = unit_sum.data_ptr<float>();
  float* sq = sq_norm.data_ptr<float>();
  float* adj = adjacent.data_ptr<float>();
  at::parallel_for(0, n_seq * n_seg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      float* dst = us + g * dim;
      float s = 0.f;
      for (int64_t c = chunk_start[g]; c < chunk_start[g + 1]; ++c) {
        const float* src = part_base + c * (dim + 2);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) dst[d] += src[d];
        s += src[dim];
      }
      sq[g] = s;
    }
  });
  for (int64_t b = 0; b < n_seq; ++b) {
    float a = 0.f;
    for (int64_t c = chunk_start[b * n_seg]; c < chunk_start[(b + 1) * n_seg]; ++c) {
      a += part_base[c * (dim + 2) + dim + 1];
    }
    adj[b] = a;
  }
  return {unit_sum, count, sq_norm, adjacent};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gainrl, m) {
  m.def("angle_stats_ext(Tensor hidden, Tensor cu_seqlens, Tensor seg_offsets) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gainrl, CPU, m) { m.impl("angle_stats_ext", &angle_stats_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "gainrl_kernels compiled kernels (registered as torch.ops.gainrl.*)"; }
