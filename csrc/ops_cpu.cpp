// CPU implementation of the batched guided step: one fused pass over the batch, parallel over
// (sample, chunk) tasks with at::parallel_for (OpenMP in torch's CPU builds).
//
// Within a task every choice is made before the element loop: the sample's scalars are computed once
// (step_math.h ddpm_sample / ddim_sample) and the variance kind, guided/unguided, clip and noise are
// template parameters, so the loop body is straight-line float32 arithmetic over contiguous
// __restrict pointers, which the compiler vectorises (exp included: step_math.h vec_expf).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops.h"
#include "step_math.h"

namespace fastguide {
namespace {

constexpr int64_t kChunk = 4096;         // elements per task: 16 KiB of each float32 input
constexpr int64_t kSerialElems = 32768;  // a task group smaller than this runs on one thread

// Calls f(sample, first element, count) for every chunk of every sample, in parallel.
template <typename F>
void for_each_chunk(int64_t batch, int64_t per_sample, const F& f) {
  if (batch == 0 || per_sample == 0) return;
  const int64_t chunk = std::min(per_sample, kChunk);
  const int64_t chunks = (per_sample + chunk - 1) / chunk;
  const int64_t grain = std::max<int64_t>(1, kSerialElems / chunk);
  at::parallel_for(0, batch * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, start = (task % chunks) * chunk;
      f(b, b * per_sample + start, std::min(chunk, per_sample - start));
    }
  });
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// The tensors of one update; absent optional inputs are nullptr.
template <typename T>
struct Pointers {
  const T *x, *eps, *v, *grad, *noise;
  T *x_prev, *xstart;
};

template <typename T>
Pointers<T> pointers(const UpdateInputs& in, at::Tensor& x_prev, at::Tensor& xstart) {
  return {ptr<T>(in.x), ptr<T>(in.eps), ptr<T>(in.v), ptr<T>(in.grad), ptr<T>(in.noise),
          x_prev.mutable_data_ptr<T>(), xstart.mutable_data_ptr<T>()};
}

// Element conversions. bfloat16 is converted here rather than by c10::BFloat16, whose NaN branch keeps
// the loops that store bfloat16 from vectorising; same rounding (to nearest even, NaN -> 0x7FC0).
template <typename T>
FG_HD float load_f(T v) {
  return static_cast<float>(v);
}
template <>
FG_HD float load_f(at::BFloat16 v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16);
}
template <typename T>
FG_HD T store_f(float f) {
  return static_cast<T>(f);
}
template <>
FG_HD at::BFloat16 store_f(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return at::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), at::BFloat16::from_bits());
}

// The element loops: n elements, every pointer a __restrict parameter (GCC honours restrict on
// parameters, and without it the 7 streams need more run-time alias checks than it will version for).
// With GCC on x86-64 Linux each loop is also cloned for AVX-512 and AVX2+FMA, picked at load time by
// the CPU (ifunc), so a build for the baseline ISA still runs wide vectors where the CPU has them.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define FG_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FG_CPU_CLONES
#endif

template <typename T, int KIND, bool GUIDED, bool CLIP>
FG_CPU_CLONES void ddpm_loop(const DdpmSample s, const T* __restrict x, const T* __restrict eps,
                            const T* __restrict v, const T* __restrict grad, const T* __restrict noise,
                            T* __restrict x_prev, T* __restrict xstart, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    float vk = 0.f, gk = 0.f, xp, xs;
    if constexpr (KIND != kKindFixed) vk = load_f(v[k]);
    if constexpr (GUIDED) gk = load_f(grad[k]);
    ddpm_element<KIND, GUIDED, CLIP>(s, load_f(x[k]), load_f(eps[k]), vk, gk, load_f(noise[k]), xp, xs);
    x_prev[k] = store_f<T>(xp);
    xstart[k] = store_f<T>(xs);
  }
}

template <typename T, bool GUIDED, bool CLIP, bool NOISE>
FG_CPU_CLONES void ddim_loop(const DdimSample s, const T* __restrict x, const T* __restrict eps,
                            const T* __restrict grad, const T* __restrict noise, T* __restrict x_prev,
                            T* __restrict xstart, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    float gk = 0.f, zk = 0.f, xp, xs;
    if constexpr (GUIDED) gk = load_f(grad[k]);
    if constexpr (NOISE) zk = load_f(noise[k]);
    ddim_element<GUIDED, CLIP, NOISE>(s, load_f(x[k]), load_f(eps[k]), gk, zk, xp, xs);
    x_prev[k] = store_f<T>(xp);
    xstart[k] = store_f<T>(xs);
  }
}

template <typename T>
const T* offset(const T* p, int64_t i) {
  return p ? p + i : nullptr;
}

// Elements [i, i + n) of one sample; reached through a function pointer chosen once per call.
template <typename T, int KIND, bool GUIDED, bool CLIP>
void ddpm_span(const DdpmSample& s, const Pointers<T>& p, int64_t i, int64_t n) {
  ddpm_loop<T, KIND, GUIDED, CLIP>(s, p.x + i, p.eps + i, offset(p.v, i), offset(p.grad, i), p.noise + i,
                                   p.x_prev + i, p.xstart + i, n);
}

template <typename T, bool GUIDED, bool CLIP, bool NOISE>
void ddim_span(const DdimSample& s, const Pointers<T>& p, int64_t i, int64_t n) {
  ddim_loop<T, GUIDED, CLIP, NOISE>(s, p.x + i, p.eps + i, offset(p.grad, i), offset(p.noise, i), p.x_prev + i,
                                    p.xstart + i, n);
}

template <typename T>
using DdpmSpan = void (*)(const DdpmSample&, const Pointers<T>&, int64_t, int64_t);
template <typename T>
using DdimSpan = void (*)(const DdimSample&, const Pointers<T>&, int64_t, int64_t);

// The loop instantiation for one (variance kind, guided, clip) choice.
template <typename T, int KIND>
DdpmSpan<T> pick_ddpm_span(bool guided, bool clip) {
  if (guided) return clip ? &ddpm_span<T, KIND, true, true> : &ddpm_span<T, KIND, true, false>;
  return clip ? &ddpm_span<T, KIND, false, true> : &ddpm_span<T, KIND, false, false>;
}

template <typename T>
DdpmSpan<T> pick_ddpm_span(int variance, bool guided, bool clip) {
  switch (variance_kind(variance)) {
    case kKindLearnedRange: return pick_ddpm_span<T, kKindLearnedRange>(guided, clip);
    case kKindLearned: return pick_ddpm_span<T, kKindLearned>(guided, clip);
    default: return pick_ddpm_span<T, kKindFixed>(guided, clip);
  }
}

template <typename T, bool GUIDED>
DdimSpan<T> pick_ddim_span(bool clip, bool noise) {
  if (clip) return noise ? &ddim_span<T, GUIDED, true, true> : &ddim_span<T, GUIDED, true, false>;
  return noise ? &ddim_span<T, GUIDED, false, true> : &ddim_span<T, GUIDED, false, false>;
}

template <typename T>
void run_ddpm(const UpdateInputs& in, at::Tensor& x_prev, at::Tensor& xstart, int variance, bool clip) {
  const bool guided = in.grad.defined();
  const float* coefs = in.coefs.const_data_ptr<float>();
  const float* nonzero = in.nonzero.const_data_ptr<float>();
  const float* scale = guided ? in.scale.const_data_ptr<float>() : nullptr;
  std::vector<DdpmSample> samples(in.batch);
  for (int64_t b = 0; b < in.batch; ++b)
    samples[b] = ddpm_sample(coefs + b * kNumCoefs, nonzero[b], guided ? scale[b] : 0.f, variance);
  const Pointers<T> p = pointers<T>(in, x_prev, xstart);
  const DdpmSpan<T> span = pick_ddpm_span<T>(variance, guided, clip);
  for_each_chunk(in.batch, in.per_sample, [&](int64_t b, int64_t i, int64_t n) { span(samples[b], p, i, n); });
}

template <typename T>
void run_ddim(const UpdateInputs& in, at::Tensor& x_prev, at::Tensor& xstart, float eta, bool clip, bool paper) {
  const bool guided = in.grad.defined();
  const float* coefs = in.coefs.const_data_ptr<float>();
  const float* nonzero = in.nonzero.const_data_ptr<float>();
  const float* scale = guided ? in.scale.const_data_ptr<float>() : nullptr;
  std::vector<DdimSample> samples(in.batch);
  for (int64_t b = 0; b < in.batch; ++b)
    samples[b] = ddim_sample(coefs + b * kNumCoefs, nonzero[b], guided ? scale[b] : 0.f, eta, paper);
  const Pointers<T> p = pointers<T>(in, x_prev, xstart);
  const bool noisy = eta > 0.f;
  const DdimSpan<T> span = guided ? pick_ddim_span<T, true>(clip, noisy) : pick_ddim_span<T, false>(clip, noisy);
  for_each_chunk(in.batch, in.per_sample, [&](int64_t b, int64_t i, int64_t n) { span(samples[b], p, i, n); });
}

// Calls f(T{}) with T the C++ element type of `dtype` (float32, float16 or bfloat16; checked before).
template <typename F>
void with_elem_type(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "fastguide: unsupported dtype ", dtype);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> guided_ddpm_update_cpu(
    const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& v,
    const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& noise, const at::Tensor& coefs, const at::Tensor& nonzero, int64_t variance,
    bool clip_denoised) {
  const UpdateInputs in = check_ddpm_inputs(x, eps, v, grad, scale, noise, coefs, nonzero, variance, at::kCPU);
  auto [x_prev, xstart] = new_outputs(in.x);
  with_elem_type(x.scalar_type(), [&](auto t) {
    run_ddpm<decltype(t)>(in, x_prev, xstart, static_cast<int>(variance), clip_denoised);
  });
  return outputs_like(x, x_prev, xstart);
}

std::tuple<at::Tensor, at::Tensor> guided_ddim_update_cpu(
    const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& noise, const at::Tensor& coefs,
    const at::Tensor& nonzero, double eta, bool clip_denoised, bool paper_form) {
  const UpdateInputs in = check_ddim_inputs(x, eps, grad, scale, noise, coefs, nonzero, eta, at::kCPU);
  auto [x_prev, xstart] = new_outputs(in.x);
  with_elem_type(x.scalar_type(), [&](auto t) {
    run_ddim<decltype(t)>(in, x_prev, xstart, static_cast<float>(eta), clip_denoised, paper_form);
  });
  return outputs_like(x, x_prev, xstart);
}

}  // namespace fastguide

TORCH_LIBRARY_IMPL(fastguide, CPU, m) {
  m.impl("guided_ddpm_update", &fastguide::guided_ddpm_update_cpu);
  m.impl("guided_ddim_update", &fastguide::guided_ddim_update_cpu);
}
