// One decode step at batch 1 with weight-only int8 matrices, bf16 activations and a bf16 KV cache.
//
// Same math as FusedDecoder.step (infer/decoder.py): the products are PyTorch's `_weight_int8pack_mm`, and
// everything between them (RMSNorm, RoPE, the cache write, attention over the cache, SiLU-gating, the
// residual adds) is plain loops here. At batch 1 those small ops cost more than the products when each is a
// separate PyTorch call (measured 1.9 ms of a 3.3 ms step); here they take a few hundred microseconds.
// Built on first use by infer/native.py; the residual stream is kept in fp32 and rounded to bf16 after each
// add, as the PyTorch step does.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;
using bf16 = at::BFloat16;

inline float to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float round_bf16(float x) { return static_cast<float>(bf16(x)); }

void rms_norm(const float* x, bf16* out, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float s = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = bf16(x[i] * s);
}

void add_residual(std::vector<float>& x, const Tensor& y) {
  const bf16* p = y.data_ptr<bf16>();
  for (size_t i = 0; i < x.size(); ++i) x[i] = round_bf16(x[i] + static_cast<float>(p[i]));
}

}  // namespace

// weights: 4 per layer (qkv, o, gate_up, down: int8 (out, in)) then the head; scales: one bf16 per row.
// k_cache, v_cache: (layers, 1, n_kv, capacity, head_dim) bf16, written at `length`.
// cos, sin: (head_dim,) bf16 rows of the RoPE tables at the token's position (sin without sign flips).
Tensor decode_step(int64_t token, int64_t length, const std::vector<Tensor>& weights,
                   const std::vector<Tensor>& scales, Tensor k_cache, Tensor v_cache, const Tensor& embed,
                   const Tensor& cos, const Tensor& sin, int64_t n_heads, int64_t n_kv, double eps) {
  const int64_t dim = embed.size(1), head_dim = cos.size(0), capacity = k_cache.size(3);
  const int64_t layers = (static_cast<int64_t>(weights.size()) - 1) / 4, half = head_dim / 2;
  const int64_t group = n_heads / n_kv, L = length;
  TORCH_CHECK(head_dim <= 256 && L < capacity && k_cache.is_contiguous() && v_cache.is_contiguous());
  const auto bf = at::TensorOptions().dtype(at::kBFloat16);
  Tensor normed = at::empty({1, dim}, bf), attn = at::empty({1, n_heads * head_dim}, bf);
  std::vector<float> x(dim), q(n_heads * head_dim), scores(L + 1);
  const bf16* row = embed.data_ptr<bf16>() + token * dim;
  for (int64_t i = 0; i < dim; ++i) x[i] = static_cast<float>(row[i]);
  const bf16 *c = cos.data_ptr<bf16>(), *s = sin.data_ptr<bf16>();
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  const int64_t layer_stride = n_kv * capacity * head_dim;

  for (int64_t l = 0; l < layers; ++l) {
    rms_norm(x.data(), normed.data_ptr<bf16>(), dim, eps);
    Tensor qkv = at::_weight_int8pack_mm(normed, weights[4 * l], scales[4 * l]);
    const bf16* h = qkv.data_ptr<bf16>();
    bf16* kc = k_cache.data_ptr<bf16>() + l * layer_stride;
    bf16* vc = v_cache.data_ptr<bf16>() + l * layer_stride;
    for (int64_t head = 0; head < n_heads + n_kv; ++head) {  // RoPE: x * cos + rotate_half(x) * sin
      const bf16* src = h + head * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        const float rotated = d < half ? -static_cast<float>(src[d + half]) : static_cast<float>(src[d - half]);
        const float r = round_bf16(static_cast<float>(src[d]) * static_cast<float>(c[d]) +
                                   rotated * static_cast<float>(s[d]));
        if (head < n_heads) q[head * head_dim + d] = r;
        else kc[((head - n_heads) * capacity + L) * head_dim + d] = bf16(r);
      }
    }
    for (int64_t g = 0; g < n_kv; ++g)
      std::memcpy(vc + (g * capacity + L) * head_dim, h + (n_heads + n_kv + g) * head_dim, head_dim * sizeof(bf16));

    bf16* out = attn.data_ptr<bf16>();
    for (int64_t head = 0; head < n_heads; ++head) {  // softmax(q k^T / sqrt(d)) v over positions 0..L
      const uint16_t* keys = reinterpret_cast<const uint16_t*>(kc + (head / group) * capacity * head_dim);
      const uint16_t* values = reinterpret_cast<const uint16_t*>(vc + (head / group) * capacity * head_dim);
      const float* qh = q.data() + head * head_dim;
      float top = -INFINITY;
      for (int64_t j = 0; j <= L; ++j) {
        const uint16_t* kj = keys + j * head_dim;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * to_float(kj[d]);
        scores[j] = dot * scale;
        top = std::max(top, scores[j]);
      }
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j <= L; ++j) {
        scores[j] = std::exp(scores[j] - top);
        total += scores[j];
      }
      float acc[256] = {0.f};
      for (int64_t j = 0; j <= L; ++j) {
        const float p = scores[j] / total;
        const uint16_t* vj = values + j * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[d] += p * to_float(vj[d]);
      }
      for (int64_t d = 0; d < head_dim; ++d) out[head * head_dim + d] = bf16(acc[d]);
    }
    add_residual(x, at::_weight_int8pack_mm(attn, weights[4 * l + 1], scales[4 * l + 1]));

    rms_norm(x.data(), normed.data_ptr<bf16>(), dim, eps);
    Tensor gate_up = at::_weight_int8pack_mm(normed, weights[4 * l + 2], scales[4 * l + 2]);
    const int64_t ffn = gate_up.size(1) / 2;
    const bf16* gu = gate_up.data_ptr<bf16>();
    Tensor act = at::empty({1, ffn}, bf);
    bf16* a = act.data_ptr<bf16>();
    for (int64_t i = 0; i < ffn; ++i) {
      const float g = static_cast<float>(gu[i]);
      a[i] = bf16(round_bf16(g / (1.f + std::exp(-g))) * static_cast<float>(gu[ffn + i]));
    }
    add_residual(x, at::_weight_int8pack_mm(act, weights[4 * l + 3], scales[4 * l + 3]));
  }
  rms_norm(x.data(), normed.data_ptr<bf16>(), dim, eps);
  return at::_weight_int8pack_mm(normed, weights[4 * layers], scales[4 * layers]);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "one batch-1 int8 decode step (see infer/native.py)");
}
