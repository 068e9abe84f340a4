// In-place softplus with row sums over fp32 score strips, AVX-512F (CPU LSSA forward).
//
// One pass over each strip: softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|), where log1p(e) = e P(e)
// with P the degree-9 polynomial of kernels/blocked.py (LOG1P_RATIO) and exp a Cephes-style
// polynomial with exponent scaling. Relative error ~2e-7 (fp32 rounding); masked scores (-inf) give 0,
// NaN stays NaN.
// The row sum is accumulated in the same loop, so the strip is read and written once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr float kLog1pRatio[10] = {
    0.9999999953848526f, -0.49999903992765343f, 0.3333000403524574f, -0.24954558871284532f,
    0.19678117257303596f, -0.15311863104930332f, 0.10614264691820346f, -0.05706420081102007f,
    0.019907160954066302f, -0.0032563784795137957f};

// exp(x) for x <= 0; 0 below -87.3 (where fp32 exp underflows), including x = -inf.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __mmask16 live = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n ln2, in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

inline __m512 softplus16(__m512 x) {
  const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
  __m512 r = _mm512_set1_ps(kLog1pRatio[9]);
  for (int i = 8; i >= 0; --i) r = _mm512_fmadd_ps(r, e, _mm512_set1_ps(kLog1pRatio[i]));
  // max_ps returns its second operand when either is NaN: NaN scores stay NaN, as in torch
  return _mm512_fmadd_ps(e, r, _mm512_max_ps(_mm512_setzero_ps(), x));
}

float softplus_row(float* x, int64_t w) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= w; j += 32) {  // two independent chains per iteration
    const __m512 a = softplus16(_mm512_loadu_ps(x + j));
    const __m512 b = softplus16(_mm512_loadu_ps(x + j + 16));
    _mm512_storeu_ps(x + j, a);
    _mm512_storeu_ps(x + j + 16, b);
    acc0 = _mm512_add_ps(acc0, a);
    acc1 = _mm512_add_ps(acc1, b);
  }
  for (; j < w; j += 16) {
    const __mmask16 m = w - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (w - j)) - 1);
    const __m512 a = _mm512_maskz_mov_ps(m, softplus16(_mm512_maskz_loadu_ps(m, x + j)));
    _mm512_mask_storeu_ps(x + j, m, a);
    acc0 = _mm512_add_ps(acc0, a);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

}  // namespace

// s: contiguous fp32 (..., w), overwritten by softplus(s); returns the row sums, shape (..., 1).
torch::Tensor softplus_rowsum_(torch::Tensor s) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == torch::kFloat && s.is_contiguous() && s.dim() > 0,
              "softplus_rowsum_ needs a contiguous float32 CPU tensor");
  const int64_t w = s.size(-1), rows = w == 0 ? 0 : s.numel() / w;
  auto shape = s.sizes().vec();
  shape.back() = 1;
  auto sums = torch::zeros(shape, s.options());
  float* data = s.data_ptr<float>();
  float* out = sums.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) out[r] = softplus_row(data + r * w, w);
  });
  return sums;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softplus_rowsum_", &softplus_rowsum_, "in-place softplus of fp32 rows, returns row sums");
}
