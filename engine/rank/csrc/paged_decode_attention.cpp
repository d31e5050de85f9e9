// Decode attention over a block-paged KV cache on the CPU: every sequence of a step in one call.
//
// out[b, h] = softmax(scale * K_b q[b, h]) V_b over the first lengths[b] positions of sequence
// b, where position p lives at row tables[b][p / block_size] * block_size + p % block_size of
// the pools k_pool/v_pool [kv_heads, rows, head_dim]; query head h reads key/value head
// h / (heads / kv_heads). Scores, softmax and the weighted sum are float32, max-subtracted as
// in SDPA. Work items are (sequence, key/value head) pairs shared over torch's intra-op
// threads; each reads its keys and values once, straight from the pool (no gather, no mask).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

template <int64_t D>
void attend(const float* __restrict__ q, const float* __restrict__ k_pool, const float* __restrict__ v_pool,
            float* __restrict__ out, const int64_t* tables, int64_t table_width, const int64_t* lengths,
            int64_t batch, int64_t heads, int64_t kv_heads, int64_t rows, int64_t block_size, float scale) {
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, kh = item % kv_heads;
      const int64_t length = lengths[b];
      const int64_t* table = tables + b * table_width;
      const float* keys = k_pool + kh * rows * D;
      const float* values = v_pool + kh * rows * D;
      scores.resize(group * length);
      for (int64_t p0 = 0; p0 < length; p0 += block_size) {
        const int64_t row0 = table[p0 / block_size] * block_size;
        const int64_t n = std::min(block_size, length - p0);
        for (int64_t g = 0; g < group; ++g) {
          const float* __restrict__ qh = q + (b * heads + kh * group + g) * D;
          float* s = scores.data() + g * length + p0;
          for (int64_t i = 0; i < n; ++i) {
            const float* __restrict__ key = keys + (row0 + i) * D;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qh[d] * key[d];
            s[i] = dot * scale;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * length;
        float top = -INFINITY;
        for (int64_t p = 0; p < length; ++p) top = std::max(top, s[p]);
        float total = 0.f;
        for (int64_t p = 0; p < length; ++p) {
          s[p] = std::exp(s[p] - top);
          total += s[p];
        }
        float acc[D];
        for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
        for (int64_t p0 = 0; p0 < length; p0 += block_size) {
          const int64_t row0 = table[p0 / block_size] * block_size;
          const int64_t n = std::min(block_size, length - p0);
          for (int64_t i = 0; i < n; ++i) {
            const float w = s[p0 + i];
            const float* __restrict__ value = values + (row0 + i) * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc[d] += w * value[d];
          }
        }
        float* o = out + (b * heads + kh * group + g) * D;
        const float inv = 1.f / total;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
      }
    }
  });
}

}  // namespace

// q [batch, heads, head_dim] float32; pools [kv_heads, rows, head_dim] float32, contiguous;
// tables [batch, width] int64 block ids; lengths [batch] int64 (>= 1).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor tables, torch::Tensor lengths, int64_t block_size,
                                     double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat &&
                  v_pool.scalar_type() == at::kFloat, "paged_decode_attention: float32 only");
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes(),
              "paged_decode_attention: q [B, H, D] and pools [KVH, rows, D]");
  TORCH_CHECK(q.size(2) == k_pool.size(2) && q.size(1) % k_pool.size(0) == 0,
              "paged_decode_attention: head_dim or head counts do not match");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "paged_decode_attention: pools must be contiguous");
  auto query = q.contiguous();
  auto table = tables.to(at::kLong).contiguous();
  auto length = lengths.to(at::kLong).contiguous();
  TORCH_CHECK(table.size(0) == q.size(0) && length.size(0) == q.size(0), "paged_decode_attention: one table per row");
  auto out = torch::empty_like(query);
  const int64_t head_dim = q.size(2);
#define M_AI_ATTEND(N)                                                                                   \
  if (head_dim == N) {                                                                                   \
    attend<N>(query.data_ptr<float>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>(),               \
              out.data_ptr<float>(), table.data_ptr<int64_t>(), table.size(1), length.data_ptr<int64_t>(), \
              q.size(0), q.size(1), k_pool.size(0), k_pool.size(1), block_size, static_cast<float>(scale)); \
    return out;                                                                                          \
  }
  M_AI_ATTEND(32)
  M_AI_ATTEND(64)
  M_AI_ATTEND(80)
  M_AI_ATTEND(96)
  M_AI_ATTEND(128)
#undef M_AI_ATTEND
  TORCH_CHECK(false, "paged_decode_attention: head_dim ", head_dim, " has no kernel");
}

// The step's new keys and values into the pools: row slots[n] of every key/value head gets
// k[n, h] and v[n, h] ([N, kv_heads, head_dim], rows contiguous, any other strides). One copy
// of head_dim floats per (token, head): index_copy_ along the pools' middle axis moved a
// 2,048-token prompt chunk at ~3 GB/s.
void write_paged_kv(torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor k, torch::Tensor v,
                    torch::Tensor slots) {
  TORCH_CHECK(k_pool.scalar_type() == at::kFloat && v_pool.scalar_type() == at::kFloat &&
                  k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "write_paged_kv: float32 only");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "write_paged_kv: pools must be contiguous");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == k_pool.size(0) &&
                  k.size(2) == k_pool.size(2) && k.stride(2) == 1 && v.stride(2) == 1,
              "write_paged_kv: k and v [N, kv_heads, head_dim] with contiguous rows");
  auto slot = slots.to(at::kLong).contiguous();
  TORCH_CHECK(slot.numel() == k.size(0), "write_paged_kv: one slot per token");
  const int64_t tokens = k.size(0), heads = k.size(1), head_dim = k.size(2), rows = k_pool.size(1);
  const int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t n = 0; n < tokens; ++n) TORCH_CHECK(sp[n] >= 0 && sp[n] < rows, "write_paged_kv: slot out of range");
  float* kp = k_pool.data_ptr<float>();
  float* vp = v_pool.data_ptr<float>();
  const float* ks = k.data_ptr<float>();
  const float* vs = v.data_ptr<float>();
  const int64_t k0 = k.stride(0), k1 = k.stride(1), v0 = v.stride(0), v1 = v.stride(1);
  const size_t bytes = head_dim * sizeof(float);
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t n = 0; n < tokens; ++n) {
        std::memcpy(kp + (h * rows + sp[n]) * head_dim, ks + n * k0 + h * k1, bytes);
        std::memcpy(vp + (h * rows + sp[n]) * head_dim, vs + n * v0 + h * v1, bytes);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over paged KV (CPU, float32)");
  m.def("write_paged_kv", &write_paged_kv, "a step's keys and values into paged pools (CPU, float32)");
}
