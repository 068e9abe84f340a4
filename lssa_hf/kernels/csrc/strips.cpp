// LSSA / LSSAR query-strip passes on CPU, forward and backward (kernels/blocked.py has the maths).
//
// Written once against ATen's at::vec::Vectorized<T>: the build (kernels/native.py) defines
// CPU_CAPABILITY_AVX512 or CPU_CAPABILITY_AVX2 with the matching -m flags, so the same source is an
// AVX-512, AVX2 or (aarch64) NEON kernel. Per strip, the two GEMMs stay in ATen/BLAS; the elementwise
// chain over the score strip (mask, softplus, sigmoid, powers in log space, row sum / max) is one or
// two vectorised passes per row, rows in parallel (at::parallel_for). The whole strip loop runs here,
// so the Python side is one call per pass.
//
// fp32: log1p(e) on 0 <= e <= 1 is e * P(e), P the degree-9 polynomial LOG1P_RATIO of blocked.py
// (max relative error 5e-9); exp / log are Sleef's 1-ulp vector functions. fp64 uses Sleef log1p.
// Masked scores carry exactly zero weight and gradient; NaN scores stay NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace {

using at::vec::Vectorized;

constexpr float kLog1pRatio[10] = {
    0.9999999953848526f, -0.49999903992765343f, 0.3333000403524574f, -0.24954558871284532f,
    0.19678117257303596f, -0.15311863104930332f, 0.10614264691820346f, -0.05706420081102007f,
    0.019907160954066302f, -0.0032563784795137957f};

// log1p(e) for 0 <= e <= 1
inline Vectorized<float> log1p_unit(const Vectorized<float>& e) {
  Vectorized<float> r(kLog1pRatio[9]);
  for (int i = 8; i >= 0; --i) r = at::vec::fmadd(r, e, Vectorized<float>(kLog1pRatio[i]));
  return e * r;
}
inline Vectorized<double> log1p_unit(const Vectorized<double>& e) { return e.log1p(); }

// softplus(s) = max(s, 0) + log1p(exp(-|s|)); e = exp(-|s|) is returned for the sigmoid.
template <typename T>
inline Vectorized<T> softplus(const Vectorized<T>& s, Vectorized<T>& e) {
  e = (Vectorized<T>(T(0)) - s.abs()).exp();
  return at::vec::maximum(s, Vectorized<T>(T(0))) + log1p_unit(e);  // maximum keeps NaN
}

// sigmoid(s) from e = exp(-|s|): 0 at s = -inf
template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& s, const Vectorized<T>& e) {
  const Vectorized<T> one(T(1));
  const Vectorized<T> num = Vectorized<T>::blendv(e, one, s >= Vectorized<T>(T(0)));
  return num / (one + e);
}

// u^q for 0 <= u <= 1 and q > 0; 0 where u = 0. Integer q (LSSAR's usual 15, 5) by repeated
// squaring (a few multiplies instead of a log and an exp), other q in log space. Bases whose power
// would be subnormal (u < tiny^(1/q)) give 0: that drops weights below 1e-38 of the row's largest
// (fp32) and avoids slow subnormal arithmetic.
template <typename T>
struct Power {
  T q;
  int64_t iq;  // q as an integer, or 0 when q is not one
  Vectorized<T> floor_u;

  explicit Power(T q_) : q(q_), iq(0), floor_u(T(0)) {
    if (q >= 0 && q <= 64 && q == std::floor(q)) iq = (int64_t)q;
    floor_u = Vectorized<T>(q > 0 ? (T)std::pow((double)std::numeric_limits<T>::min(), 1.0 / (double)q) : T(0));
  }
  Vectorized<T> operator()(const Vectorized<T>& u) const {
    const Vectorized<T> zero(T(0));
    const Vectorized<T> x = Vectorized<T>::blendv(zero, u, u >= floor_u);
    if (iq > 0 || q == 0) {  // q = 0 (LSSAR p = 1 in backward): 1 where u > 0
      Vectorized<T> result = q == 0 ? Vectorized<T>::blendv(zero, Vectorized<T>(T(1)), x > zero) : Vectorized<T>(T(1));
      Vectorized<T> base = x;
      for (int64_t e = iq; e > 0; e >>= 1) {
        if (e & 1) result = result * base;
        if (e > 1) base = base * base;
      }
      return result;
    }
    return Vectorized<T>::blendv(zero, (x.log() * Vectorized<T>(q)).exp(), x > zero);
  }
};

// Calls f(j, n) over [0, w) in vector steps; n < V::size() only for the last one.
template <typename T, typename F>
inline void for_vec(int64_t w, F f) {
  constexpr int64_t step = Vectorized<T>::size();
  for (int64_t j = 0; j < w; j += step) f(j, std::min(step, w - j));
}

// keep the first n lanes of x, zero the rest (tail of a row)
template <typename T>
inline Vectorized<T> head(const Vectorized<T>& x, int64_t n) {
  return n == Vectorized<T>::size() ? x : Vectorized<T>::set(Vectorized<T>(T(0)), x, n);
}

template <typename T>
inline T sum_of(const Vectorized<T>& acc) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, acc);
}

template <typename T>
inline T max_of(const Vectorized<T>& acc) {
  return at::vec::vec_reduce_all<T>(
      [](Vectorized<T>& a, Vectorized<T>& b) { return at::vec::maximum(a, b); }, acc);
}

// Where one strip row lives: its score / gradient rows, visible prefix and mask, global row index.
struct Strip {
  int64_t b, hkv, g, lq, lk, q0, q1, k0, k1;
  bool causal_cut;        // implicit causal mask: row i sees keys <= lk - lq + q0 + i
  const bool* mask;       // or an explicit (Bm, Hm, Lq, Lk) mask (last stride 1), or nullptr
  int64_t ms0, ms1, ms2;  // its strides, 0 on broadcast dims

  int64_t bq() const { return q1 - q0; }
  int64_t width() const { return k1 - k0; }
  int64_t rows() const { return b * hkv * g * bq(); }
  // index into a contiguous (B, Hkv, G, Lq) row tensor
  int64_t global(int64_t r) const {
    const int64_t bh = r / (g * bq()), rem = r % (g * bq());
    return (bh * g + rem / bq()) * lq + q0 + rem % bq();
  }
  int64_t visible(int64_t r) const {  // columns [visible, width) are hidden by the causal cut
    if (!causal_cut) return width();
    const int64_t i = r % bq();
    return std::clamp<int64_t>(lk - lq + q0 + i + 1 - k0, 0, width());
  }
  template <typename T>
  void apply_mask(int64_t r, T* x, int64_t w) const {  // explicit mask: hidden scores -> -inf
    if (mask == nullptr) return;
    const int64_t bh = r / (g * bq()), rem = r % (g * bq());
    const int64_t bi = bh / hkv, h = (bh % hkv) * g + rem / bq(), qi = q0 + rem % bq();
    const bool* m = mask + bi * ms0 + h * ms1 + qi * ms2 + k0;
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < w; ++j) x[j] = m[j] ? x[j] : ninf;
  }
};

template <typename T>
void zero_tail(T* x, int64_t from, int64_t w) {
  std::fill(x + from, x + w, T(0));
}

// LSSA forward row: x <- softplus(x), returns S.
template <typename T>
T fwd_lssa_row(T* x, int64_t w) {
  using V = Vectorized<T>;
  V acc(T(0)), e;
  for_vec<T>(w, [&](int64_t j, int64_t n) {
    const V sp = head(softplus(V::loadu(x + j, n), e), n);
    sp.store(x + j, n);
    acc = acc + sp;
  });
  return sum_of(acc);
}

// LSSAR forward row: x <- weights; writes W, m, 1/scale, fallback (blocked.fwd_lssar). tie = 1 +
// the row's tie tolerance: a largest score within rounding of the mean is no re-weighted mass.
template <typename T>
void fwd_lssar_row(T* x, int64_t w, T alpha, T tie, const Power<T>& pow_p, T* st) {
  using V = Vectorized<T>;
  V sum(T(0)), top(T(0)), e;
  for_vec<T>(w, [&](int64_t j, int64_t n) {
    const V sp = head(softplus(V::loadu(x + j, n), e), n);
    sp.store(x + j, n);
    sum = sum + sp;
    top = at::vec::maximum(top, sp);
  });
  const T s_total = sum_of(sum), m = alpha * s_total, mx = max_of(top);
  const bool fallback = !(mx > m * tie);  // NaN rows too: they keep (NaN) LSSA weights
  const T inv_scale = fallback ? T(1) : T(1) / (mx - m);
  T total = s_total;
  if (!fallback) {
    V acc(T(0));
    const V vm(m), vinv(inv_scale), zero(T(0));
    for_vec<T>(w, [&](int64_t j, int64_t n) {
      const V u = at::vec::maximum((V::loadu(x + j, n) - vm) * vinv, zero);
      const V wt = head(pow_p(u), n);
      wt.store(x + j, n);
      acc = acc + wt;
    });
    total = sum_of(acc);
  }
  st[0] = total, st[1] = m, st[2] = inv_scale, st[3] = fallback ? T(1) : T(0);
}

// LSSA backward row: x <- softplus(x) (the weights), gr <- (gr - D) sigmoid(x).
template <typename T>
void bwd_lssa_row(T* x, T* gr, int64_t w, T delta) {
  using V = Vectorized<T>;
  const V vd(delta);
  V e;
  for_vec<T>(w, [&](int64_t j, int64_t n) {
    const V s = V::loadu(x + j, n);
    const V sp = softplus(s, e);
    sp.store(x + j, n);
    ((V::loadu(gr + j, n) - vd) * sigmoid(s, e)).store(gr + j, n);
  });
}

// LSSAR backward row (non-fallback): x <- weights u^p, gr <- (h - alpha sum h) sigmoid(x) with
// h = u^(p-1) (gr - D); sig: a row of scratch. floor_u > 0 (half-precision inputs) bounds the
// gradient: u^(p-1) becomes u^p / max(u, floor_u) (blocked.bwd_lssar).
template <typename T>
void bwd_lssar_row(T* x, T* gr, T* sig, int64_t w, T delta, T m, T inv_scale, T alpha, T floor_u,
                   const Power<T>& pow_p, const Power<T>& pow_pm1) {
  using V = Vectorized<T>;
  const V vd(delta), vm(m), vinv(inv_scale), zero(T(0));
  V hsum(T(0)), e;
  for_vec<T>(w, [&](int64_t j, int64_t n) {
    const V s = V::loadu(x + j, n);
    const V sp = softplus(s, e);
    const V sg = sigmoid(s, e);
    const V u = at::vec::maximum((sp - vm) * vinv, zero);
    V um1;
    if (floor_u > T(0)) {  // u^p / max(u, floor_u), zero where u = 0 (relu'(0) = 0)
      const V up = pow_p(u);
      up.store(x + j, n);
      um1 = V::blendv(zero, up / at::vec::maximum(u, V(floor_u)), u > zero);
    } else {
      um1 = pow_pm1(u);  // relu'(0) = 0: zero where u = 0, for every p
      (um1 * u).store(x + j, n);
    }
    const V h = head(um1 * (V::loadu(gr + j, n) - vd), n);
    hsum = hsum + h;
    (h * sg).store(gr + j, n);
    sg.store(sig + j, n);
  });
  const V shift(alpha * sum_of(hsum));
  for_vec<T>(w, [&](int64_t j, int64_t n) {
    (V::loadu(gr + j, n) - shift * V::loadu(sig + j, n)).store(gr + j, n);
  });
}

// dst (+)= src * c over n values
template <typename T>
void scale_row(T* dst, const T* src, int64_t n, T c, bool accumulate) {
  using V = Vectorized<T>;
  const V vc(c);
  for_vec<T>(n, [&](int64_t j, int64_t m) {
    V x = V::loadu(src + j, m) * vc;
    if (accumulate) x = x + V::loadu(dst + j, m);
    x.store(dst + j, m);
  });
}

Strip make_strip(const at::Tensor& k, const c10::optional<at::Tensor>& mask, int64_t b, int64_t hkv,
                 int64_t g, int64_t lq, const int64_t* row) {
  Strip st{b, hkv, g, lq, k.size(2), row[0], row[1], row[2], row[3], false, nullptr, 0, 0, 0};
  if (row[4] != 0) {  // this strip needs its mask
    if (mask.has_value()) {
      const at::Tensor& m = *mask;
      st.mask = m.data_ptr<bool>();
      st.ms0 = m.size(0) == 1 ? 0 : m.stride(0);
      st.ms1 = m.size(1) == 1 ? 0 : m.stride(1);
      st.ms2 = m.stride(2);
    } else {
      st.causal_cut = true;
    }
  }
  return st;
}

void check_inputs(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& mask, const at::Tensor& plan) {
  for (const auto* t : {&qs, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->dim() == 4 &&
                    t->scalar_type() == qs.scalar_type(),
                "lssa native strips: q, k, v must be contiguous 4-D CPU tensors of one dtype");
  TORCH_CHECK(qs.scalar_type() == at::kFloat || qs.scalar_type() == at::kDouble,
              "lssa native strips: float32 or float64 only");
  TORCH_CHECK(plan.scalar_type() == at::kLong && plan.dim() == 2 && plan.size(1) == 5 &&
                  plan.is_contiguous(), "lssa native strips: plan must be an (S, 5) int64 tensor");
  if (mask.has_value())
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->stride(3) == 1,
                "lssa native strips: mask must be a 4-D bool tensor with unit last stride");
}

// (most rows x keys of one strip, widest strip) over the plan's (q0, q1, k0, k1, needs_mask) rows
std::pair<int64_t, int64_t> extent(const at::Tensor& plan) {
  const int64_t* pl = plan.data_ptr<int64_t>();
  int64_t most = 0, widest = 0;
  for (int64_t i = 0; i < plan.size(0); ++i, pl += 5) {
    most = std::max(most, (pl[1] - pl[0]) * (pl[3] - pl[2]));
    widest = std::max(widest, pl[3] - pl[2]);
  }
  return {most, widest};
}

int64_t grain(int64_t w) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(w, 1)); }

at::Tensor rows_of(const at::Tensor& t, const Strip& st) {  // (B, Hkv, G, Lq) -> (B, Hkv, G*bq, 1)
  return t.slice(3, st.q0, st.q1).reshape({st.b, st.hkv, st.g * st.bq(), 1});
}

// LSSA needs no running max (softplus weights add up), so a wide strip is cut into key tiles of
// about tile_elems scores (native.TILE_ELEMS) that stay in cache: S and sum_j sp_j v_j accumulate
// over the tiles. (LSSAR needs each row's mean and max before any weight: it keeps whole strips.)
template <typename T>
void lssa_forward_tiled(const Strip& st, const at::Tensor& qs5, const at::Tensor& k, const at::Tensor& v,
                        at::Tensor& work, T* stp, T* op, T tiny, int64_t tile_w) {
  const int64_t b = st.b, hkv = st.hkv, rows = st.rows(), d = qs5.size(4), dv = v.size(3);
  const auto qb = qs5.slice(3, st.q0, st.q1).reshape({b, hkv, st.g * st.bq(), d});
  auto acc = at::zeros({b, hkv, st.g * st.bq(), dv}, qs5.options());
  std::vector<T> total(rows, T(0));
  for (int64_t t0 = st.k0; t0 < st.k1; t0 += tile_w) {
    Strip tile = st;
    tile.k0 = t0, tile.k1 = std::min(st.k1, t0 + tile_w);
    const int64_t w = tile.width();
    auto s = work.narrow(0, 0, rows * w).view({b, hkv, st.g * st.bq(), w});
    at::matmul_out(s, qb, k.slice(2, tile.k0, tile.k1).transpose(-1, -2));
    T* sp = s.data_ptr<T>();
    at::parallel_for(0, rows, grain(w), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* x = sp + r * w;
        const int64_t vis = tile.visible(r);
        tile.apply_mask(r, x, vis);
        zero_tail(x, vis, w);
        total[r] += fwd_lssa_row(x, vis);
      }
    });
    acc.flatten(0, 1).baddbmm_(s.flatten(0, 1), v.slice(2, tile.k0, tile.k1).flatten(0, 1));
  }
  const T* arow = acc.data_ptr<T>();
  at::parallel_for(0, rows, grain(dv), [&](int64_t r0, int64_t r1) {  // out = sum sp v / S
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t gr = st.global(r);
      stp[gr] = total[r];
      scale_row(op + gr * dv, arow + r * dv, dv, T(1) / std::max(total[r], tiny), false);
    }
  });
}

// Forward strip loop. Returns out (B, Hq, Lq, Dv) and stats (nstat, B, Hkv, G, Lq):
// LSSA: S. LSSAR: W, m, 1/scale, fallback.
std::vector<at::Tensor> forward(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& mask, const at::Tensor& alpha,
                                const at::Tensor& tie, const at::Tensor& plan, bool lssar, double p,
                                int64_t tile_elems, int64_t min_tile) {
  check_inputs(qs, k, v, mask, plan);
  const int64_t b = qs.size(0), hq = qs.size(1), lq = qs.size(2), d = qs.size(3);
  const int64_t hkv = k.size(1), dv = v.size(3), g = hq / hkv;
  const auto qs5 = qs.view({b, hkv, g, lq, d});
  auto out5 = at::zeros({b, hkv, g, lq, dv}, qs.options());
  auto stats = at::zeros({lssar ? 4 : 1, b, hkv, g, lq}, qs.options());
  if (lssar) stats.slice(0, 2, 4).fill_(1.0);  // rows outside the plan: fallback rows, scale 1
  const int64_t nplan = plan.size(0), plane = b * hkv * g * lq;
  const int64_t* pl = plan.data_ptr<int64_t>();
  auto work = at::empty({b * hq * extent(plan).first}, qs.options());
  const double tiny = qs.scalar_type() == at::kFloat ? std::numeric_limits<float>::min()
                                                      : std::numeric_limits<double>::min();
  AT_DISPATCH_FLOATING_TYPES(qs.scalar_type(), "lssa_strips_forward", [&] {
    scalar_t* stp = stats.data_ptr<scalar_t>();
    scalar_t* op = out5.data_ptr<scalar_t>();
    const scalar_t* al = alpha.data_ptr<scalar_t>();
    const scalar_t* ti = tie.data_ptr<scalar_t>();
    const Power<scalar_t> pow_p((scalar_t)p);
    for (int64_t i = 0; i < nplan; ++i) {
      const Strip st = make_strip(k, mask, b, hkv, g, lq, pl + 5 * i);
      const int64_t w = st.width();
      const int64_t tile_w = std::max<int64_t>(min_tile, tile_elems / st.rows());
      if (!lssar && tile_elems > 0 && w > tile_w) {
        lssa_forward_tiled(st, qs5, k, v, work, stp, op, (scalar_t)tiny, tile_w);
        continue;
      }
      auto s = work.narrow(0, 0, st.rows() * w).view({b, hkv, g * st.bq(), w});
      at::matmul_out(s, qs5.slice(3, st.q0, st.q1).reshape({b, hkv, g * st.bq(), d}),
                     k.slice(2, st.k0, st.k1).transpose(-1, -2));
      scalar_t* sp = s.data_ptr<scalar_t>();
      at::parallel_for(0, st.rows(), grain(w), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* x = sp + r * w;
          const int64_t vis = st.visible(r), gr = st.global(r);
          st.apply_mask(r, x, vis);
          zero_tail(x, vis, w);
          if (lssar) {
            scalar_t row_st[4];
            fwd_lssar_row(x, vis, al[gr], ti[gr], pow_p, row_st);
            for (int c = 0; c < 4; ++c) stp[c * plane + gr] = row_st[c];
          } else {
            stp[gr] = fwd_lssa_row(x, vis);
          }
        }
      });
      const auto o = at::matmul(s, v.slice(2, st.k0, st.k1));
      const scalar_t* orow = o.data_ptr<scalar_t>();
      at::parallel_for(0, st.rows(), grain(dv), [&](int64_t r0, int64_t r1) {  // out = o / W
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t gr = st.global(r);
          scale_row(op + gr * dv, orow + r * dv, dv, scalar_t(1) / std::max(stp[gr], scalar_t(tiny)), false);
        }
      });
    }
  });
  return {out5.view({b, hq, lq, dv}), stats};
}

// Backward strip loop: dqs, dk, dv from dout and the forward's out and stats.
std::vector<at::Tensor> backward(const at::Tensor& dout, const at::Tensor& qs, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& stats,
                                 const c10::optional<at::Tensor>& mask, const at::Tensor& alpha,
                                 const at::Tensor& plan, bool lssar, double p, double floor) {
  check_inputs(qs, k, v, mask, plan);
  const int64_t b = qs.size(0), hq = qs.size(1), lq = qs.size(2), d = qs.size(3);
  const int64_t hkv = k.size(1), dv = v.size(3), g = hq / hkv;
  const auto qs5 = qs.view({b, hkv, g, lq, d});
  const auto dout5 = dout.contiguous().view({b, hkv, g, lq, dv});
  const auto delta = (dout5 * out.view({b, hkv, g, lq, dv})).sum(-1).contiguous();  // D = <dout, out>
  auto dq5 = at::zeros_like(qs5);
  auto dk = at::zeros_like(k), dvv = at::zeros_like(v);
  const int64_t nplan = plan.size(0), plane = b * hkv * g * lq;
  const int64_t* pl = plan.data_ptr<int64_t>();
  const auto [most, widest] = extent(plan);
  auto work_s = at::empty({b * hq * most}, qs.options()), work_g = at::empty({b * hq * most}, qs.options());
  const double tiny = qs.scalar_type() == at::kFloat ? std::numeric_limits<float>::min()
                                                      : std::numeric_limits<double>::min();
  AT_DISPATCH_FLOATING_TYPES(qs.scalar_type(), "lssa_strips_backward", [&] {
    const scalar_t* stp = stats.data_ptr<scalar_t>();
    const scalar_t* al = alpha.data_ptr<scalar_t>();
    const scalar_t* dl = delta.data_ptr<scalar_t>();
    scalar_t* dqp = dq5.data_ptr<scalar_t>();
    const Power<scalar_t> pow_p((scalar_t)p), pow_pm1((scalar_t)(p - 1.0));
    for (int64_t i = 0; i < nplan; ++i) {
      const Strip st = make_strip(k, mask, b, hkv, g, lq, pl + 5 * i);
      const int64_t w = st.width(), bq = st.bq();
      const auto qb = qs5.slice(3, st.q0, st.q1).reshape({b, hkv, g * bq, d});
      const auto dob = dout5.slice(3, st.q0, st.q1).reshape({b, hkv, g * bq, dv});
      const auto ks = k.slice(2, st.k0, st.k1), vs = v.slice(2, st.k0, st.k1);
      auto s = work_s.narrow(0, 0, st.rows() * w).view({b, hkv, g * bq, w});
      auto grad = work_g.narrow(0, 0, st.rows() * w).view({b, hkv, g * bq, w});
      at::matmul_out(s, qb, ks.transpose(-1, -2));
      at::matmul_out(grad, dob, vs.transpose(-1, -2));  // g_j = <dout, v_j>
      scalar_t* sp = s.data_ptr<scalar_t>();
      scalar_t* gp = grad.data_ptr<scalar_t>();
      at::parallel_for(0, st.rows(), grain(w), [&](int64_t r0, int64_t r1) {
        std::vector<scalar_t> scratch(lssar ? widest : 0);
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t *x = sp + r * w, *gx = gp + r * w;
          const int64_t vis = st.visible(r), gi = st.global(r);
          st.apply_mask(r, x, vis);
          zero_tail(x, vis, w);
          zero_tail(gx, vis, w);
          if (lssar && stp[3 * plane + gi] == scalar_t(0)) {
            const scalar_t m = stp[plane + gi], inv_scale = stp[2 * plane + gi];
            bwd_lssar_row(x, gx, scratch.data(), vis, dl[gi], m, inv_scale, al[gi],
                          (scalar_t)(floor * m * inv_scale), pow_p, pow_pm1);
          } else {  // LSSA, or an LSSAR fallback row (LSSA weights)
            bwd_lssa_row(x, gx, vis, dl[gi]);
          }
        }
      });
      // 0 on rows without visible keys (1 / tiny times a large upstream gradient is inf, and inf * 0 NaN)
      const auto total = rows_of(stats[0], st);
      auto inv_total = at::where(total > 0, total.clamp_min(tiny).reciprocal(), at::zeros_like(total));
      auto coef = inv_total;
      if (lssar) {  // P / (W scale), or 1 / S on fallback rows
        auto fb = rows_of(stats[3], st);
        coef = at::where(fb > 0, at::ones_like(fb), rows_of(stats[2], st) * p) * inv_total;
      }
      // per-row coefficients go on the small operands, not on the strip
      const auto dqs = at::matmul(grad, ks).contiguous();
      const scalar_t* dqr = dqs.data_ptr<scalar_t>();
      const auto coef_c = coef.contiguous();
      const scalar_t* cf = coef_c.data_ptr<scalar_t>();
      at::parallel_for(0, st.rows(), grain(d), [&](int64_t r0, int64_t r1) {  // dq += coef (ds k)
        for (int64_t r = r0; r < r1; ++r) scale_row(dqp + st.global(r) * d, dqr + r * d, d, cf[r], true);
      });
      dk.slice(2, st.k0, st.k1).flatten(0, 1).baddbmm_(grad.transpose(-1, -2).flatten(0, 1),
                                                        (qb * coef).flatten(0, 1));
      dvv.slice(2, st.k0, st.k1).flatten(0, 1).baddbmm_(s.transpose(-1, -2).flatten(0, 1),
                                                         (dob * inv_total).flatten(0, 1));
    }
  });
  return {dq5.view({b, hq, lq, d}), dk, dvv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "LSSA/LSSAR forward strip loop: (out, stats)");
  m.def("backward", &backward, "LSSA/LSSAR backward strip loop: (dqs, dk, dv)");
  m.def("vector_width", [] { return (int64_t)Vectorized<float>::size(); }, "float lanes of this build");
}
