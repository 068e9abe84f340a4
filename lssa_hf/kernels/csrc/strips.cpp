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
// Masked scores carry exactly zero weight and gradient; NaN scores stay NaN. Rows whose scores all
// underflow softplus get exp(s - r) for softplus and sigmoid (``base``): the second pass of ops.strips.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/utils/pybind.h>

#include <dlfcn.h>

#include <algorithm>
#include <limits>
#include <type_traits>
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

// exp(x) for x <= 0: Sleef's 1-ulp exp, or with fast (fp32 only) ATen's degree-5 exp_u20 (20 ulp,
// what ATen's CPU flash attention uses for softmax)
template <bool fast, typename T>
inline Vectorized<T> exp_neg(const Vectorized<T>& x) {
  if constexpr (fast && std::is_same_v<T, float>) return x.exp_u20();
  else return x.exp();
}

// softplus(s) = max(s, 0) + log1p(exp(-|s|)); e = exp(-|s|) is returned for the sigmoid. LSSA's
// passes take the fast exp (2e-6 relative error on a weight, averaged out in A v); LSSAR's do not, as
// p-th powers amplify it p-fold.
template <typename T, bool fast = false>
inline Vectorized<T> softplus(const Vectorized<T>& s, Vectorized<T>& e) {
  e = exp_neg<fast>(Vectorized<T>(T(0)) - s.abs());
  return at::vec::maximum(s, Vectorized<T>(T(0))) + log1p_unit(e);  // maximum keeps NaN
}

// sigmoid(s) from e = exp(-|s|): 0 at s = -inf
template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& s, const Vectorized<T>& e) {
  const Vectorized<T> one(T(1));
  const Vectorized<T> num = Vectorized<T>::blendv(e, one, s >= Vectorized<T>(T(0)));
  return num / (one + e);
}

// The weight base of a score: softplus(s), with e = exp(-|s|) for the sigmoid; on a shifted row (r < 0:
// every score underflows softplus, functional.underflow_shift) exp(s - r), which is also its derivative
// (r is a row constant). The branch is per row.
template <typename T, bool fast = false>
inline Vectorized<T> base(const Vectorized<T>& s, Vectorized<T>& e, T r) {
  if (r < T(0)) {
    e = (s - Vectorized<T>(r)).exp();
    return e;
  }
  return softplus<T, fast>(s, e);
}

// d base / ds from the e of ``base``
template <typename T>
inline Vectorized<T> dbase(const Vectorized<T>& s, const Vectorized<T>& e, T r) {
  return r < T(0) ? e : sigmoid(s, e);
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
    return visible_at(r % bq(), k0, width());
  }
  template <typename T>
  void apply_mask(int64_t r, T* x, int64_t w) const {  // explicit mask: hidden scores -> -inf
    const int64_t bh = r / (g * bq()), rem = r % (g * bq());
    apply_mask_at(bh * g + rem / bq(), q0 + rem % bq(), k0, x, w);
  }
  // the same for query row qi of (batch, query head) bhg = (b * hkv + h) * g + gi, keys from kfrom
  template <typename T>
  void apply_mask_at(int64_t bhg, int64_t qi, int64_t kfrom, T* x, int64_t w) const {
    if (mask == nullptr) return;
    const bool* m = mask + (bhg / (hkv * g)) * ms0 + (bhg % (hkv * g)) * ms1 + qi * ms2 + kfrom;
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < w; ++j) x[j] = m[j] ? x[j] : ninf;
  }
  // keys [kfrom, kfrom + w) that strip row i (of bq) sees before the causal cut
  int64_t visible_at(int64_t i, int64_t kfrom, int64_t w) const {
    if (!causal_cut) return w;
    return std::clamp<int64_t>(lk - lq + q0 + i + 1 - kfrom, 0, w);
  }
};

template <typename T>
void zero_tail(T* x, int64_t from, int64_t w) {
  std::fill(x + from, x + w, T(0));
}

// LSSA forward row: x <- softplus(x) (exp(x - r) on a shifted row), returns S.
template <typename T>
T fwd_lssa_row(T* x, int64_t w, T r) {
  using V = Vectorized<T>;
  V acc(T(0)), e;
  for_vec<T>(w, [&](int64_t j, int64_t n) {
    const V sp = head(base<T, true>(V::loadu(x + j, n), e, r), n);
    sp.store(x + j, n);
    acc = acc + sp;
  });
  return sum_of(acc);
}

// LSSAR forward row: x <- weights; writes W, m, 1/scale, fallback (blocked.fwd_lssar). tie = 1 +
// the row's tie tolerance: a largest score within rounding of the mean is no re-weighted mass.
template <typename T>
void fwd_lssar_row(T* x, int64_t w, T alpha, T tie, const Power<T>& pow_p, T* st, T r) {
  using V = Vectorized<T>;
  V sum(T(0)), top(T(0)), e;
  for_vec<T>(w, [&](int64_t j, int64_t n) {
    const V sp = head(base(V::loadu(x + j, n), e, r), n);
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
void bwd_lssa_row(T* x, T* gr, int64_t w, T delta, T r) {
  using V = Vectorized<T>;
  const V vd(delta);
  V e;
  for_vec<T>(w, [&](int64_t j, int64_t n) {
    const V s = V::loadu(x + j, n);
    const V sp = base(s, e, r);
    sp.store(x + j, n);
    ((V::loadu(gr + j, n) - vd) * dbase(s, e, r)).store(gr + j, n);
  });
}

// LSSAR backward row (non-fallback): x <- weights u^p, gr <- (h - alpha sum h) sigmoid(x) with
// h = u^(p-1) (gr - D); sig: a row of scratch. floor_u > 0 (half-precision inputs) bounds the
// gradient: u^(p-1) becomes u^p / max(u, floor_u) (blocked.bwd_lssar).
template <typename T>
void bwd_lssar_row(T* x, T* gr, T* sig, int64_t w, T delta, T m, T inv_scale, T alpha, T floor_u,
                   const Power<T>& pow_p, const Power<T>& pow_pm1, T r) {
  using V = Vectorized<T>;
  const V vd(delta), vm(m), vinv(inv_scale), zero(T(0));
  V hsum(T(0)), e;
  for_vec<T>(w, [&](int64_t j, int64_t n) {
    const V s = V::loadu(x + j, n);
    const V sp = base(s, e, r);
    const V sg = dbase(s, e, r);
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

// a row's underflow shift (0: none) from the optional (B, Hkv, G, Lq) shifts
template <typename T>
inline T shift_at(const T* shp, int64_t row) {
  return shp == nullptr ? T(0) : shp[row];
}

template <typename T>
const T* shift_ptr(const c10::optional<at::Tensor>& shift) {
  if (!shift.has_value()) return nullptr;
  TORCH_CHECK(shift->is_contiguous() && shift->scalar_type() == c10::CppTypeToScalarType<T>::value,
              "lssa native strips: shift must be a contiguous (B, Hkv, G, Lq) tensor of the inputs' dtype");
  return shift->data_ptr<T>();
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

// Row-major C (m x n, ldc) = beta C + op(A) op(B) (op: transposed where asked; A is m x k or k x m),
// single-threaded (called inside at::parallel_for). The BLAS torch links (MKL, OpenBLAS: Fortran
// sgemm_ / dgemm_) where its symbol is found, as ATen's own CPU flash attention does; else ATen's mm.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);

void* blas_symbol(const char* name) {
  void* f = dlsym(RTLD_DEFAULT, name);
  if (f == nullptr) {  // torch's libraries are loaded RTLD_LOCAL: ask libtorch_cpu itself
    if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) f = dlsym(lib, name);
  }
  return f;
}
template <typename T> struct Blas;
template <> struct Blas<float> {
  static sgemm_fn fn() { static const auto f = (sgemm_fn)blas_symbol("sgemm_"); return f; }
};
template <> struct Blas<double> {
  static dgemm_fn fn() { static const auto f = (dgemm_fn)blas_symbol("dgemm_"); return f; }
};

template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
             int64_t ldb, T beta, T* c, int64_t ldc) {
  if (auto f = Blas<T>::fn()) {  // column-major: C^T = op(B)^T op(A)^T
    const int M = (int)n, N = (int)m, K = (int)k, LDA = (int)ldb, LDB = (int)lda, LDC = (int)ldc;
    const T one(1);
    f(trans_b ? "T" : "N", trans_a ? "T" : "N", &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
    return;
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto A = trans_a ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opt).t()
                         : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opt);
  const auto B = trans_b ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opt).t()
                         : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opt);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opt);
  if (beta == T(0)) at::mm_out(C, A, B);
  else C.addmm_(A, B, beta);
}

// LSSA forward of one strip, flash style: LSSA needs no running max (softplus weights add up), so
// each task (a query head's block of q_block rows) walks its keys in tiles of k_block: S tile =
// q k^T (a q_block x k_block buffer that stays in cache), softplus in place, acc += S_tile v; then
// out = acc / S. Key tiles past the block's causal cut are skipped.
template <typename T>
void lssa_forward_fused(const Strip& st, const T* qp, const T* kp, const T* vp, const T* shp, int64_t d,
                        int64_t dv, T* stp, T* op, T tiny, int64_t q_block, int64_t k_block) {
  const int64_t bq = st.bq(), qb = std::min(q_block, bq), kb = std::min(k_block, st.width());
  const int64_t nqb = (bq + qb - 1) / qb, heads = st.b * st.hkv * st.g;
  at::parallel_for(0, heads * nqb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> s(qb * kb), acc(qb * dv), total(qb);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bhg = t / nqb, r0 = (t % nqb) * qb, rn = std::min(qb, bq - r0), bh = bhg / st.g;
      const T* q = qp + (bhg * st.lq + st.q0 + r0) * d;
      const T* kk = kp + bh * st.lk * d;
      const T* vv = vp + bh * st.lk * dv;
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(total.begin(), total.end(), T(0));
      // the last row of the block sees the most keys
      const int64_t kend = st.k0 + st.visible_at(r0 + rn - 1, st.k0, st.width());
      for (int64_t k0 = st.k0; k0 < kend; k0 += kb) {
        const int64_t w = std::min(kb, kend - k0);
        gemm_rm<T>(false, true, rn, w, d, q, d, kk + k0 * d, d, T(0), s.data(), w);
        for (int64_t i = 0; i < rn; ++i) {
          T* x = s.data() + i * w;
          const int64_t vis = st.visible_at(r0 + i, k0, w);
          st.apply_mask_at(bhg, st.q0 + r0 + i, k0, x, vis);
          zero_tail(x, vis, w);
          total[i] += fwd_lssa_row(x, vis, shift_at(shp, bhg * st.lq + st.q0 + r0 + i));
        }
        gemm_rm<T>(false, false, rn, dv, w, s.data(), w, vv + k0 * dv, dv, T(1), acc.data(), dv);
      }
      for (int64_t i = 0; i < rn; ++i) {
        const int64_t gr = bhg * st.lq + st.q0 + r0 + i;
        stp[gr] = total[i];
        scale_row(op + gr * dv, acc.data() + i * dv, dv, T(1) / std::max(total[i], tiny), false);
      }
    }
  });
}

// LSSA backward of one strip, flash style: one task per (batch, KV head), which owns its dk / dv
// rows, walks its query heads' blocks of q_block rows and their key tiles of k_block: S and
// G = dout v^T tiles in cache, weights and (G - D) sigmoid in place, then dv += P^T (dout / S),
// dk += dS^T (q / S), dq += dS k / S. Needs as many (batch, KV head) pairs as threads.
template <typename T>
void lssa_backward_fused(const Strip& st, const T* qp, const T* kp, const T* vp, const T* dop, const T* total,
                         const T* dl, const T* shp, int64_t d, int64_t dv, T* dqp, T* dkp, T* dvp,
                         int64_t q_block, int64_t k_block) {
  const int64_t bq = st.bq(), qb = std::min(q_block, bq), kb = std::min(k_block, st.width());
  at::parallel_for(0, st.b * st.hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> s(qb * kb), gr(qb * kb), dq(qb * d), qc(qb * d), doc(qb * dv), coef(qb);
    for (int64_t bh = t0; bh < t1; ++bh) {
      const T* kk = kp + bh * st.lk * d;
      const T* vv = vp + bh * st.lk * dv;
      T* dk = dkp + bh * st.lk * d;
      T* dvv = dvp + bh * st.lk * dv;
      for (int64_t bhg = bh * st.g; bhg < (bh + 1) * st.g; ++bhg) {
        for (int64_t r0 = 0; r0 < bq; r0 += qb) {
          const int64_t rn = std::min(qb, bq - r0), row0 = bhg * st.lq + st.q0 + r0;
          for (int64_t i = 0; i < rn; ++i) {  // 0 on rows without visible keys
            coef[i] = total[row0 + i] > T(0) ? T(1) / total[row0 + i] : T(0);
            for (int64_t c = 0; c < d; ++c) qc[i * d + c] = qp[(row0 + i) * d + c] * coef[i];
            for (int64_t c = 0; c < dv; ++c) doc[i * dv + c] = dop[(row0 + i) * dv + c] * coef[i];
          }
          std::fill(dq.begin(), dq.end(), T(0));
          const int64_t kend = st.k0 + st.visible_at(r0 + rn - 1, st.k0, st.width());
          for (int64_t k0 = st.k0; k0 < kend; k0 += kb) {
            const int64_t w = std::min(kb, kend - k0);
            gemm_rm<T>(false, true, rn, w, d, qp + row0 * d, d, kk + k0 * d, d, T(0), s.data(), w);
            gemm_rm<T>(false, true, rn, w, dv, dop + row0 * dv, dv, vv + k0 * dv, dv, T(0), gr.data(), w);
            for (int64_t i = 0; i < rn; ++i) {
              T *x = s.data() + i * w, *gx = gr.data() + i * w;
              const int64_t vis = st.visible_at(r0 + i, k0, w);
              st.apply_mask_at(bhg, st.q0 + r0 + i, k0, x, vis);
              zero_tail(x, vis, w);
              zero_tail(gx, vis, w);
              bwd_lssa_row(x, gx, vis, dl[row0 + i], shift_at(shp, row0 + i));
            }
            gemm_rm<T>(true, false, w, dv, rn, s.data(), w, doc.data(), dv, T(1), dvv + k0 * dv, dv);
            gemm_rm<T>(true, false, w, d, rn, gr.data(), w, qc.data(), d, T(1), dk + k0 * d, d);
            gemm_rm<T>(false, false, rn, d, w, gr.data(), w, kk + k0 * d, d, T(1), dq.data(), d);
          }
          for (int64_t i = 0; i < rn; ++i) scale_row(dqp + (row0 + i) * d, dq.data() + i * d, d, coef[i], true);
        }
      }
    }
  });
}

// Forward strip loop. Returns out (B, Hq, Lq, Dv) and stats (nstat, B, Hkv, G, Lq):
// LSSA: S. LSSAR: W, m, 1/scale, fallback.
std::vector<at::Tensor> forward(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& mask, const at::Tensor& alpha,
                                const at::Tensor& tie, const at::Tensor& plan, bool lssar, double p,
                                int64_t q_block, int64_t k_block, const c10::optional<at::Tensor>& shift) {
  check_inputs(qs, k, v, mask, plan);
  const int64_t b = qs.size(0), hq = qs.size(1), lq = qs.size(2), d = qs.size(3);
  const int64_t hkv = k.size(1), dv = v.size(3), g = hq / hkv;
  const auto qs5 = qs.view({b, hkv, g, lq, d});
  auto out5 = at::zeros({b, hkv, g, lq, dv}, qs.options());
  auto stats = at::zeros({lssar ? 4 : 1, b, hkv, g, lq}, qs.options());
  if (lssar) stats.slice(0, 2, 4).fill_(1.0);  // rows outside the plan: fallback rows, scale 1
  const int64_t nplan = plan.size(0), plane = b * hkv * g * lq;
  const int64_t* pl = plan.data_ptr<int64_t>();
  // LSSA's fused forward needs no strip buffer. (LSSAR keeps strips: a fused LSSAR forward needs
  // each row's softplus mean and max first, so a second q k^T GEMM and softplus pass per tile: an
  // experimental one measured clearly slower than the strips.)
  const bool fused = !lssar && k_block > 0;
  auto work = at::empty({fused ? 0 : b * hq * extent(plan).first}, qs.options());
  const double tiny = qs.scalar_type() == at::kFloat ? std::numeric_limits<float>::min()
                                                      : std::numeric_limits<double>::min();
  AT_DISPATCH_FLOATING_TYPES(qs.scalar_type(), "lssa_strips_forward", [&] {
    scalar_t* stp = stats.data_ptr<scalar_t>();
    scalar_t* op = out5.data_ptr<scalar_t>();
    const scalar_t* al = alpha.data_ptr<scalar_t>();
    const scalar_t* ti = tie.data_ptr<scalar_t>();
    const Power<scalar_t> pow_p((scalar_t)p);
    const scalar_t* shp = shift_ptr<scalar_t>(shift);
    for (int64_t i = 0; i < nplan; ++i) {
      const Strip st = make_strip(k, mask, b, hkv, g, lq, pl + 5 * i);
      const int64_t w = st.width();
      if (fused) {
        lssa_forward_fused(st, qs.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shp, d,
                           dv, stp, op, (scalar_t)tiny, q_block, k_block);
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
            fwd_lssar_row(x, vis, al[gr], ti[gr], pow_p, row_st, shift_at(shp, gr));
            for (int c = 0; c < 4; ++c) stp[c * plane + gr] = row_st[c];
          } else {
            stp[gr] = fwd_lssa_row(x, vis, shift_at(shp, gr));
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
                                 const at::Tensor& plan, bool lssar, double p, double floor, int64_t q_block,
                                 int64_t k_block, const c10::optional<at::Tensor>& shift) {
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
  // LSSA's fused backward: one task per (batch, KV head), so only where they keep every thread busy
  const bool fused = !lssar && k_block > 0 && b * hkv >= at::get_num_threads();
  const int64_t work = fused ? 0 : b * hq * most;
  auto work_s = at::empty({work}, qs.options()), work_g = at::empty({work}, qs.options());
  const double tiny = qs.scalar_type() == at::kFloat ? std::numeric_limits<float>::min()
                                                      : std::numeric_limits<double>::min();
  AT_DISPATCH_FLOATING_TYPES(qs.scalar_type(), "lssa_strips_backward", [&] {
    const scalar_t* stp = stats.data_ptr<scalar_t>();
    const scalar_t* al = alpha.data_ptr<scalar_t>();
    const scalar_t* dl = delta.data_ptr<scalar_t>();
    scalar_t* dqp = dq5.data_ptr<scalar_t>();
    const Power<scalar_t> pow_p((scalar_t)p), pow_pm1((scalar_t)(p - 1.0));
    const scalar_t* shp = shift_ptr<scalar_t>(shift);
    for (int64_t i = 0; i < nplan; ++i) {
      const Strip st = make_strip(k, mask, b, hkv, g, lq, pl + 5 * i);
      if (fused) {
        lssa_backward_fused(st, qs.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                            dout5.data_ptr<scalar_t>(), stp, dl, shp, d, dv, dqp, dk.data_ptr<scalar_t>(),
                            dvv.data_ptr<scalar_t>(), q_block, k_block);
        continue;
      }
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
                          (scalar_t)(floor * m * inv_scale), pow_p, pow_pm1, shift_at(shp, gi));
          } else {  // LSSA, or an LSSAR fallback row (LSSA weights)
            bwd_lssa_row(x, gx, vis, dl[gi], shift_at(shp, gi));
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
