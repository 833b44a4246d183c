// The arithmetic of one guided DDPM / DDIM update, per sample and per element, shared by the CPU
// and the CUDA kernels so that both backends evaluate the same float32 expressions in the same order
// as the torch reference (kernels/reference.py, fastguide/diffusion.py).
//
// This header includes neither torch nor CUDA headers: ops_cuda.cu compiles against it with nvcc
// alone, which is what lets CI compile-check the CUDA kernels on a machine with a CPU-only torch.
#pragma once

#include <cmath>
#include <cstdint>

// Always inlined: a call left in an element loop (GCC stops inlining in large template functions)
// would keep that loop scalar.
#if defined(__CUDACC__)
#define FG_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FG_HD inline __attribute__((always_inline))
#else
#define FG_HD inline
#endif

namespace fastguide {

// Column of each schedule coefficient in the (B, kNumCoefs) `coefs` matrix: the fields of
// fastguide.schedule.StepCoefficients in order (kernels.reference.COEF_FIELDS).
enum Coef : int {
  kAlphaBar = 0,                // ᾱ_t
  kAlphaBarPrev,                // ᾱ_{t-1}
  kSqrtRecipAlphaBar,           // 1/sqrt(ᾱ_t)
  kSqrtRecipm1AlphaBar,         // sqrt(1/ᾱ_t − 1)
  kPosteriorMeanCoef1,          // coefficient of x̂_0 in the posterior mean
  kPosteriorMeanCoef2,          // coefficient of x_t in the posterior mean
  kPosteriorVariance,           // β̃_t
  kPosteriorLogVarianceClipped, // log β̃_t (β̃_1 at t = 0)
  kLogBeta,                     // log β_t
  kFixedLargeVariance,          // β_t (β̃_1 at t = 0)
  kFixedLargeLogVariance,       // its log
  kNumCoefs
};

// kernels.reference.VARIANCE_CODES
enum Variance : int { kLearnedRange = 0, kLearned = 1, kFixedSmall = 2, kFixedLarge = 3 };

// What a kernel must do per element to get σ²: interpolate from v, take v as log σ², or nothing
// (the fixed variances are per-sample constants). Kernels are templated on it.
enum VarianceKind : int { kKindLearnedRange = 0, kKindLearned = 1, kKindFixed = 2 };

inline VarianceKind variance_kind(int variance) {
  return variance == kLearnedRange ? kKindLearnedRange : variance == kLearned ? kKindLearned : kKindFixed;
}

// clamp(v, −1, 1) that lets NaN through, as torch.clamp does (std::min/max would swallow it).
FG_HD float clip_unit(float v) { return v < -1.f ? -1.f : (v > 1.f ? 1.f : v); }

#if !defined(__CUDACC__)
// exp(x) in float32 written without branches or calls so that the compiler vectorises the loops
// that use it (libm's expf is a scalar call). Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, and
// Cephes' degree-6 polynomial for e^r: within 1.4 ulp over the normal range. 2^n is applied in two
// halves so that every n of the clamped range [−150, 128] gives normal factors: underflow rounds to
// 0 and overflow to inf as in expf. NaN propagates through r; n is computed from a NaN-free copy.
FG_HD float vec_expf(float x) {
  const float xc = x < -104.f ? -104.f : (x > 89.f ? 89.f : x);
  const float xn = xc == xc ? xc : 0.f;
  const float n = (xn * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni >> 1;
  const float s1 = __builtin_bit_cast(float, static_cast<uint32_t>(half + 127) << 23);
  const float s2 = __builtin_bit_cast(float, static_cast<uint32_t>(ni - half + 127) << 23);
  return (p * s1) * s2;
}
#endif

// e^x for the per-element variance: libdevice on the GPU, the vectorisable polynomial on the CPU.
FG_HD float exp_elem(float x) {
#if defined(__CUDACC__)
  return expf(x);
#else
  return vec_expf(x);
#endif
}

// ---- DDPM: x_{t−1} = μ + σ²·s·∇ + nonzero·σ·z  (paper Eq. 8; ADM p_sample + condition_mean) ----

// The per-sample scalars of one DDPM update, hoisted out of the element loop.
struct DdpmSample {
  float sqrt_recip_alpha_bar;
  float sqrt_recipm1_alpha_bar;
  float mean_coef1;       // of x̂_0
  float mean_coef2;       // of x_t
  float var;              // σ² (fixed variances)
  float noise_std;        // nonzero · σ (fixed variances)
  float log_beta;         // learned_range: upper end of log σ²
  float log_var_clipped;  // learned_range: lower end of log σ²
  float nonzero;          // 0 at t = 0: no noise is added
  float scale;            // guidance scale s_b (guided updates)
};

FG_HD DdpmSample ddpm_sample(const float* c, float nonzero, float scale, int variance) {
  DdpmSample s;
  s.sqrt_recip_alpha_bar = c[kSqrtRecipAlphaBar];
  s.sqrt_recipm1_alpha_bar = c[kSqrtRecipm1AlphaBar];
  s.mean_coef1 = c[kPosteriorMeanCoef1];
  s.mean_coef2 = c[kPosteriorMeanCoef2];
  const bool large = variance == kFixedLarge;
  s.var = large ? c[kFixedLargeVariance] : c[kPosteriorVariance];
  const float log_var = large ? c[kFixedLargeLogVariance] : c[kPosteriorLogVarianceClipped];
  s.noise_std = nonzero * expf(0.5f * log_var);
  s.log_beta = c[kLogBeta];
  s.log_var_clipped = c[kPosteriorLogVarianceClipped];
  s.nonzero = nonzero;
  s.scale = scale;
  return s;
}

template <int KIND, bool GUIDED, bool CLIP>
FG_HD void ddpm_element(const DdpmSample& s, float x, float eps, float v, float grad, float noise, float& x_prev,
                        float& xstart) {
  float xs = s.sqrt_recip_alpha_bar * x - s.sqrt_recipm1_alpha_bar * eps;  // Eq. 5
  if (CLIP) xs = clip_unit(xs);
  float mean = s.mean_coef1 * xs + s.mean_coef2 * x;  // DDPM Eq. 7
  float var = s.var, noise_std = s.noise_std;
  if (KIND != kKindFixed) {
    float log_var = v;
    if (KIND == kKindLearnedRange) {  // Improved DDPM Eq. 15
      const float frac = (v + 1.f) / 2.f;
      log_var = frac * s.log_beta + (1.f - frac) * s.log_var_clipped;
    }
    // one exp per element: σ = e^{log σ² / 2}, σ² = σ·σ (over/underflows where e^{log σ²} does)
    const float sigma = exp_elem(0.5f * log_var);
    var = sigma * sigma;
    noise_std = s.nonzero * sigma;
  }
  if (GUIDED) mean = mean + var * (grad * s.scale);
  x_prev = mean + noise_std * noise;
  xstart = xs;
}

// ---- DDIM (paper Eq. 4 and Alg. 1; ADM ddim_sample + condition_score) ----

struct DdimSample {
  float sqrt_recip_alpha_bar;
  float sqrt_recipm1_alpha_bar;
  float guidance_weight;      // sqrt(1 − ᾱ_t) (ADM form) or 1 (paper form)
  float sqrt_alpha_bar_prev;  // coefficient of x̂_0 in x_{t−1}
  float eps_coef;             // sqrt(1 − ᾱ_{t−1} − σ²), coefficient of ε
  float noise_coef;           // nonzero · σ
  float scale;                // guidance scale s_b (guided updates)
};

FG_HD DdimSample ddim_sample(const float* c, float nonzero, float scale, float eta, bool paper_form) {
  DdimSample s;
  const float ab = c[kAlphaBar], abp = c[kAlphaBarPrev];
  s.sqrt_recip_alpha_bar = c[kSqrtRecipAlphaBar];
  s.sqrt_recipm1_alpha_bar = c[kSqrtRecipm1AlphaBar];
  s.guidance_weight = paper_form ? 1.f : sqrtf(1.f - ab);
  const float sigma = eta * sqrtf((1.f - abp) / (1.f - ab)) * sqrtf(1.f - ab / abp);
  s.sqrt_alpha_bar_prev = sqrtf(abp);
  s.eps_coef = sqrtf(1.f - abp - sigma * sigma);
  s.noise_coef = nonzero * sigma;
  s.scale = scale;
  return s;
}

template <bool GUIDED, bool CLIP, bool NOISE>
FG_HD void ddim_element(const DdimSample& s, float x, float eps, float grad, float noise, float& x_prev,
                        float& xstart) {
  const float sx = s.sqrt_recip_alpha_bar * x;
  float xs = sx - s.sqrt_recipm1_alpha_bar * eps;
  if (CLIP) xs = clip_unit(xs);
  if (GUIDED) {  // ε̂ = ε − w·s·∇, with ε re-derived from the clipped x̂_0; x̂_0 is not clipped again
    const float eps_hat = (sx - xs) / s.sqrt_recipm1_alpha_bar;
    xs = sx - s.sqrt_recipm1_alpha_bar * (eps_hat - s.guidance_weight * (grad * s.scale));
  }
  const float e = (sx - xs) / s.sqrt_recipm1_alpha_bar;
  float xp = xs * s.sqrt_alpha_bar_prev + s.eps_coef * e;
  if (NOISE) xp = xp + s.noise_coef * noise;
  x_prev = xp;
  xstart = xs;
}

}  // namespace fastguide
