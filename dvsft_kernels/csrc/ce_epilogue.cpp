// Native CPU epilogue of the "torch" implementation: cross-entropy over one chunk of logits
// (float32, or bfloat16 / float16 as a 16-bit GEMM wrote them) and its logit gradient, the
// contract of the Triton `ce_chunk` launcher (dvsft_kernels/ops/kernels/ce_chunk.py) on CPU. Per row i of x (m, V), all math float32:
//
//     y    = softcap * tanh(x / softcap)                     (softcap given)   else y = x
//     lse  = logsumexp_j y_j
//     loss = (1 - eps) (lse - y_t) + eps (lse - mean_j y_j) + zl lse^2          (unscaled)
//     G_ij = s_i [p_ij (1 + 2 zl lse) - (1 - eps) Q_j - eps / V] dy/dx         (p = softmax(y))
//     pred = first argmax_j y_j                                                 (-1 if not wanted)
//
// Hard targets t (m,): y_t = y[t], Q_j = [j == t]. Soft targets t (m, K) with probabilities q (m, K):
// y_t = sum_k q_k y[t_k], Q_j = sum_k q_k [j == t_k] (duplicate ids add). Hard is soft with K = 1
// and q = 1, bit for bit (1 * v == v), so both share one code path.
//
// One row per task (at::parallel_for). Sweep 1 reads the row once from memory in blocks of
// kBlock floats (L1-sized): block max, then the block's sum of exp(y - running max) and of y
// (summed per block in float32 lanes, across blocks in double). Sweep 2 (gradient) re-reads the
// row, now in L2, and writes G in place over x or into a bfloat16 / float16 buffer. 16-bit logits are
// widened to float32 a block at a time (into the L1 block buffer) before either sweep reads them, and
// G is formed in float32 and narrowed once per element, so the math is the float32 path's. Built on
// first use by dvsft_kernels/native.py; csrc/README.md has the build and the figures.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kBlock = 1024;  // floats: 4 KB, a multiple of every vector width
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Params {
  float eps, zl, cap, inv_cap;
  bool has_cap, has_eps;
  int64_t fault;  // test-only planted faults (tests/ops/test_native.py): 0 none
};

// the K target slots of the rows: ids t (m, K) and probabilities q (m, K), q == nullptr: all 1 (hard)
struct Targets {
  const int64_t* t;
  const float* q;
  int64_t K;
  float prob(int64_t r, int64_t k) const { return q ? q[r * K + k] : 1.f; }
};

inline float hmax(const Vec& v) {
  alignas(64) float buf[kW];
  v.store(buf);
  float r = buf[0];
  for (int64_t k = 1; k < kW; ++k) r = std::max(r, buf[k]);
  return r;
}

inline float hsum(const Vec& v) {
  alignas(64) float buf[kW];
  v.store(buf);
  float r = 0.f;
  for (int64_t k = 0; k < kW; ++k) r += buf[k];
  return r;
}

inline Vec ycap(const Vec& x, const Params& p) {
  if (!p.has_cap) return x;
  return (x * Vec(p.inv_cap)).tanh() * Vec(p.cap);
}

// dy/dx = 1 - tanh^2(u) = 4 e / (1 + e)^2 with e = exp(-2 |u|): relatively accurate where tanh^2
// rounds to 1 (the formula of kernels/common.py softcap_tanh)
inline Vec sech2(const Vec& x, const Params& p) {
  Vec e = ((x * Vec(p.inv_cap)).abs() * Vec(-2.f)).exp();
  Vec r = Vec(1.f) / (Vec(1.f) + e);
  return Vec(4.f) * e * r * r;
}

inline float first(const Vec& v) {
  alignas(64) float buf[kW];
  v.store(buf);
  return buf[0];
}

inline float scalar_y(float x, const Params& p) { return first(ycap(Vec(x), p)); }

// n 16-bit values widened to float32 into dst, a vector at a time
template <typename in_t>
inline void to_float(const in_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    Vec v;
    at::vec::load_to_float<in_t>(src + j, v);
    v.store(dst + j);
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// n float32 values into a row of out_t (16-bit: ATen's vectorised round-to-nearest-even)
template <typename out_t>
inline void from_float(const float* src, out_t* dst, int64_t n) {
  if constexpr (std::is_same_v<out_t, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename in_t, typename out_t>
void run_rows(in_t* x, int64_t sx, const Targets tg, const float* s, out_t* g, int64_t sg, float* loss,
              float* lse_out, int64_t* pred, int64_t m, int64_t V, const Params p, bool grad, bool argmax) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  // in place without softcap: sweep 1 leaves e = exp(y - M_b) over x (M_b: the running max after
  // block b) and sweep 2 only rescales it, one exp per element in all
  bool inplace = false;
  if constexpr (std::is_same_v<out_t, float> && std::is_same_v<in_t, float>) inplace = grad && g == x && sg == sx;
  const bool keep_e = inplace && !p.has_cap;
  const int64_t nblocks = (V + kBlock - 1) / kBlock;
  const int64_t K = tg.K;
  // Q_j per id when K > 1 and G is formed from x (not over e): a V-float scratch of which only the
  // K target entries are ever touched (set, add, read), so duplicates cost O(K), not O(K^2) or O(V)
  const bool need_q = grad && !keep_e && K > 1;
  at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
    alignas(64) float ybuf[kBlock];
    alignas(64) float gbuf[kBlock];  // G of one block before narrowing to a 16-bit out_t
    std::vector<float> block_max(keep_e ? nblocks : 0);
    std::vector<float> x_t(K);  // the target logits, read before either sweep overwrites x
    std::unique_ptr<float[]> qsum(need_q ? new float[V] : nullptr);
    for (int64_t r = r0; r < r1; ++r) {
      in_t* xr = x + r * sx;
      float* xf = nullptr;  // the row as float32 in place: float32 logits only
      if constexpr (std::is_same_v<in_t, float>) xf = xr;
      const int64_t* tr = tg.t + r * K;
      for (int64_t k = 0; k < K; ++k) x_t[k] = static_cast<float>(xr[tr[k]]);
      // sweep 1: running max M, S = sum exp(y - M) (double across blocks), sum y
      float M = -kInf;
      double S = 0.0, SY = 0.0;
      int64_t arg = 0;
      for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
        const int64_t n = std::min(kBlock, V - b0);
        float* yb = xf ? xf + b0 : nullptr;
        if (!xf || p.has_cap) {  // float32 y once per block, reused by the sweeps below
          const float* xb = yb;
          if constexpr (!std::is_same_v<in_t, float>) {
            to_float(xr + b0, ybuf, n);
            xb = ybuf;
          }
          if (p.has_cap) {
            for (int64_t j = 0; j < n; j += kW) {
              const int64_t c = std::min(kW, n - j);
              ycap(Vec::loadu(xb + j, c), p).store(ybuf + j, c);
            }
          }
          yb = ybuf;
        }
        Vec vm(-kInf);
        int64_t j = 0;
        for (; j + kW <= n; j += kW) vm = at::vec::maximum(vm, Vec::loadu(yb + j));
        if (j < n) vm = at::vec::maximum(vm, Vec::set(Vec(-kInf), Vec::loadu(yb + j, n - j), n - j));
        const float bm = hmax(vm);
        if (bm > M) {  // strict: the first block reaching the row max keeps the argmax
          if (M != -kInf) S *= std::exp(static_cast<double>(M) - bm);
          M = bm;
          if (argmax) {
            arg = b0;
            for (int64_t k = 0; k < n; ++k) {
              if (yb[k] == bm) {
                arg = b0 + k;
                break;
              }
            }
          }
        }
        if (keep_e) block_max[b0 / kBlock] = M;
        if (M == -kInf) continue;  // all -inf so far: nothing to add (e = exp(-inf) = 0 below)
        const Vec vM(M);
        Vec se(0.f), sy(0.f);
        j = 0;
        for (; j + kW <= n; j += kW) {
          const Vec y = Vec::loadu(yb + j);
          const Vec e = (y - vM).exp_u20();
          se += e;
          if (p.has_eps) sy += y;
          if (keep_e) e.store(yb + j);
        }
        if (j < n) {
          const Vec y = Vec::set(Vec(-kInf), Vec::loadu(yb + j, n - j), n - j);
          const Vec e = (y - vM).exp();
          se += e;
          if (p.has_eps) sy += Vec::set(Vec(0.f), y, n - j);
          if (keep_e) e.store(yb + j, n - j);
        }
        S += hsum(se);
        if (p.has_eps) SY += hsum(sy);
      }
      const float Sf = static_cast<float>(S);
      const float logS = std::log(Sf);
      const float lse = M + logS;
      double yq = 0.0;  // sum_k q_k y[t_k]; fault 3 (test-only) weighs slot 0 alone, by 1
      for (int64_t k = 0; k < (p.fault == 3 ? 1 : K); ++k)
        yq += static_cast<double>(p.fault == 3 ? 1.f : tg.prob(r, k)) * scalar_y(x_t[k], p);
      const float y_t = static_cast<float>(yq);
      float l = (M - y_t) + logS;
      if (p.has_eps) l = (1.f - p.eps) * l + p.eps * ((M - static_cast<float>(SY / V)) + logS);
      if (p.fault != 1) l += p.zl * lse * lse;
      loss[r] = l;
      lse_out[r] = lse;
      pred[r] = argmax ? arg : -1;
      if (!grad) continue;
      // sweep 2: G = a exp(y - M) - c (- d at the target), times dy/dx under softcap
      const float sc = s ? s[r] : 1.f;
      const float k = p.fault == 2 ? 1.f : 1.f + 2.f * p.zl * lse;
      const float a = sc * k / Sf;
      const float c = sc * p.eps / static_cast<float>(V);
      const float d = sc * (1.f - p.eps);
      const Vec vc(c);
      out_t* gr = g + r * sg;
      if (keep_e) {  // G = (a exp(M_b - M)) e - c over e (float32 x only)
        for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
          const int64_t n = std::min(kBlock, V - b0);
          const float mb = block_max[b0 / kBlock];
          float* eb = xf + b0;
          if (mb == -kInf) {  // a block of -inf logits before the first finite one: e was not written
            std::fill(eb, eb + n, -c);
            continue;
          }
          const Vec f(a * std::exp(mb - M));
          int64_t j = 0;
          for (; j + kW <= n; j += kW) (f * Vec::loadu(eb + j) - vc).store(eb + j);
          if (j < n) (f * Vec::loadu(eb + j, n - j) - vc).store(eb + j, n - j);
        }
        for (int64_t k = 0; k < (p.fault == 4 ? 1 : K); ++k) xf[tr[k]] -= d * tg.prob(r, k);  // dups add
        continue;
      }
      // from x, a block at a time: a 16-bit x is widened into ybuf first, so G may overwrite it
      // (out_t == in_t, in place); a 16-bit G is formed in gbuf and narrowed once
      const Vec va(a), vM(M);
      for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
        const int64_t nb = std::min(kBlock, V - b0);
        const float* xb = ybuf;
        if constexpr (std::is_same_v<in_t, float>) {
          xb = xr + b0;
        } else {
          to_float(xr + b0, ybuf, nb);
        }
        float* gb = gbuf;
        if constexpr (std::is_same_v<out_t, float>) gb = gr + b0;
        for (int64_t j = 0; j < nb; j += kW) {
          const int64_t n = std::min(kW, nb - j);
          const Vec xv = n == kW ? Vec::loadu(xb + j) : Vec::loadu(xb + j, n);
          Vec gv = va * (ycap(xv, p) - vM).exp() - vc;
          if (p.has_cap) gv = gv * sech2(xv, p);
          if (n == kW) gv.store(gb + j);
          else gv.store(gb + j, n);
        }
        if constexpr (!std::is_same_v<out_t, float>) from_float(gbuf, gr + b0, nb);
      }
      // the target entries again from x, with an id's whole one-hot share Q: one rounding to out_t.
      // Subtracting from a 16-bit G already written would round twice, an error of 2^-9 p where
      // G ~ s (p - Q) may be near 0 (a confident row)
      if (need_q) {
        for (int64_t k = 0; k < K; ++k) qsum[tr[k]] = 0.f;
        for (int64_t k = 0; k < K; ++k) qsum[tr[k]] += tg.prob(r, k);
      }
      for (int64_t k = 0; k < (p.fault == 4 ? 1 : K); ++k) {  // fault 4 (test-only): slot 0 only
        const float Q = need_q ? qsum[tr[k]] : tg.prob(r, k);  // duplicates write the same value
        const Vec xt(x_t[k]);
        Vec gt = va * (ycap(xt, p) - vM).exp() - vc - Vec(d * Q);
        if (p.has_cap) gt = gt * sech2(xt, p);
        gr[tr[k]] = static_cast<out_t>(first(gt));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_chunk(at::Tensor x, const at::Tensor& t,
                                                        const std::optional<at::Tensor>& q,
                                                        const std::optional<at::Tensor>& s, double eps,
                                                        double zl, std::optional<double> softcap,
                                                        bool compute_grad, const std::optional<at::Tensor>& grad_out,
                                                        bool want_argmax, int64_t fault) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                   x.scalar_type() == at::kHalf),
              "x: expected a 2-D float32, bfloat16 or float16 CPU tensor");
  const int64_t m = x.size(0), V = x.size(1);
  TORCH_CHECK(V >= 1, "x: empty vocabulary");
  TORCH_CHECK(V == 1 || x.stride(1) == 1, "x: needs unit stride along V");
  TORCH_CHECK(t.device().is_cpu() && (t.dim() == 1 || t.dim() == 2) && t.size(0) == m &&
                  t.scalar_type() == at::kLong && t.is_contiguous(),
              "targets: expected a contiguous int64 CPU tensor of shape (m,) or (m, K)");
  const int64_t K = t.dim() == 2 ? t.size(1) : 1;
  TORCH_CHECK(K >= 1, "targets: K = 0 slots");
  const float* qp = nullptr;
  if (q.has_value()) {
    TORCH_CHECK(q->device().is_cpu() && q->sizes() == t.sizes() && q->scalar_type() == at::kFloat &&
                    q->is_contiguous(),
                "target_probs: expected a contiguous float32 CPU tensor shaped like targets");
    qp = q->data_ptr<float>();
  }
  TORCH_CHECK(qp || K == 1, "target_probs: required with K > 1 targets per row");
  const float* sp = nullptr;
  if (s.has_value() && compute_grad) {
    TORCH_CHECK(s->device().is_cpu() && s->dim() == 1 && s->size(0) == m && s->scalar_type() == at::kFloat &&
                    s->is_contiguous(),
                "row_scale: expected a contiguous float32 CPU tensor of shape (m,)");
    sp = s->data_ptr<float>();
  }
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < m * K; ++i) TORCH_CHECK(tp[i] >= 0 && tp[i] < V, "targets: value outside [0, V)");
  const Targets tg{tp, qp, K};
  Params p;
  p.eps = static_cast<float>(eps);
  p.zl = static_cast<float>(zl);
  p.has_cap = softcap.has_value();
  p.cap = p.has_cap ? static_cast<float>(*softcap) : 1.f;
  p.inv_cap = 1.f / p.cap;
  p.has_eps = eps > 0;
  p.fault = fault;
  auto fopt = x.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({m}, fopt), lse = at::empty({m}, fopt);
  at::Tensor pred = at::empty({m}, fopt.dtype(at::kLong));
  if (m == 0) return {loss, lse, pred};
  // G over x (its own dtype) unless grad_out is given
  at::Tensor go = (compute_grad && grad_out.has_value()) ? *grad_out : x;
  TORCH_CHECK(go.device().is_cpu() && go.dim() == 2 && go.size(0) == m && go.size(1) == V &&
                  (V == 1 || go.stride(1) == 1),
              "grad_out: expected (m, V) with unit stride along V");
  auto run = [&](auto* xp, auto* gp) {
    run_rows(xp, x.stride(0), tg, sp, gp, go.stride(0), loss.data_ptr<float>(), lse.data_ptr<float>(),
             pred.data_ptr<int64_t>(), m, V, p, compute_grad, want_argmax);
  };
  auto with_out = [&](auto* xp) {
    switch (go.scalar_type()) {
      case at::kFloat:
        return run(xp, go.data_ptr<float>());
      case at::kBFloat16:
        return run(xp, go.data_ptr<c10::BFloat16>());
      case at::kHalf:
        return run(xp, go.data_ptr<c10::Half>());
      default:
        TORCH_CHECK(false, "grad_out: expected float32, bfloat16 or float16");
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      with_out(x.data_ptr<float>());
      break;
    case at::kBFloat16:
      with_out(x.data_ptr<c10::BFloat16>());
      break;
    default:
      with_out(x.data_ptr<c10::Half>());
  }
  return {loss, lse, pred};
}

// which vector unit this build uses, for native_status()
std::string capability() {
#if defined(CPU_CAPABILITY_AVX512)
  std::string r = "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  std::string r = "AVX2";
#else
  std::string r = "DEFAULT";
#endif
#if defined(_OPENMP)
  return r + ", OpenMP";
#else
  return r + ", one thread";
#endif
}

}  // namespace

TORCH_LIBRARY(dvsft_native, lib) {
  lib.def(
      "ce_chunk(Tensor(a!) x, Tensor t, Tensor? q, Tensor? s, float eps, float zl, float? softcap, bool compute_grad, "
      "Tensor(b!)? grad_out, bool want_argmax, int fault) -> (Tensor, Tensor, Tensor)");
  lib.def("capability() -> str");
  lib.impl("ce_chunk", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(ce_chunk));
  lib.impl("capability", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(capability));
}
