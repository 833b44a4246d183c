// CUDA kernels of the batched guided step: one grid-stride elementwise pass per update.
//
// Each thread handles packs of VEC consecutive elements (VEC = 4: one 16-byte float4 load per
// float32 input) when every pointer is aligned to a pack and a sample's size is a multiple of VEC,
// so a pack never straddles two samples; otherwise VEC = 1. The per-sample scalars are recomputed
// from that sample's row of `coefs` per pack (a few flops against memory traffic), which keeps one
// launch per update. The arithmetic itself is step_math.h, shared with the CPU kernels.
//
// Compiles with nvcc alone (no torch headers); ops_cuda.cpp is the torch-facing launcher.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_api.h"
#include "step_math.h"

namespace fastguide {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements moved as one aligned access (float4 for N = 4 float32).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, int64_t i, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p + i);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_float(pk.v[j]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t i, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int j = 0; j < N; ++j) pk.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, N>*>(p + i) = pk;
}

template <int N>
__device__ __forceinline__ void zero_pack(float (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = 0.f;
}

template <typename T, int KIND, bool GUIDED, int VEC>
__global__ void __launch_bounds__(kThreads) guided_ddpm_kernel(UpdateLaunch a, int variance) {
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ eps = static_cast<const T*>(a.eps);
  const T* __restrict__ v = static_cast<const T*>(a.v);
  const T* __restrict__ grad = static_cast<const T*>(a.grad);
  const T* __restrict__ noise = static_cast<const T*>(a.noise);
  T* __restrict__ x_prev = static_cast<T*>(a.x_prev);
  T* __restrict__ pred_xstart = static_cast<T*>(a.pred_xstart);
  const int64_t packs = a.batch * a.per_sample / VEC;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < packs;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = k * VEC;
    const int64_t b = i / a.per_sample;
    const DdpmSample s = ddpm_sample(a.coefs + b * kNumCoefs, a.nonzero[b], GUIDED ? a.scale[b] : 0.f, variance);
    float xv[VEC], ev[VEC], vv[VEC], gv[VEC], zv[VEC], xp[VEC], xs[VEC];
    load_pack<T, VEC>(x, i, xv);
    load_pack<T, VEC>(eps, i, ev);
    load_pack<T, VEC>(noise, i, zv);
    if constexpr (KIND != kKindFixed) load_pack<T, VEC>(v, i, vv); else zero_pack<VEC>(vv);
    if constexpr (GUIDED) load_pack<T, VEC>(grad, i, gv); else zero_pack<VEC>(gv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (a.clip_denoised) {
        ddpm_element<KIND, GUIDED, true>(s, xv[j], ev[j], vv[j], gv[j], zv[j], xp[j], xs[j]);
      } else {
        ddpm_element<KIND, GUIDED, false>(s, xv[j], ev[j], vv[j], gv[j], zv[j], xp[j], xs[j]);
      }
    }
    store_pack<T, VEC>(x_prev, i, xp);
    store_pack<T, VEC>(pred_xstart, i, xs);
  }
}

template <typename T, bool GUIDED, bool NOISE, int VEC>
__global__ void __launch_bounds__(kThreads) guided_ddim_kernel(UpdateLaunch a, float eta, bool paper_form) {
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ eps = static_cast<const T*>(a.eps);
  const T* __restrict__ grad = static_cast<const T*>(a.grad);
  const T* __restrict__ noise = static_cast<const T*>(a.noise);
  T* __restrict__ x_prev = static_cast<T*>(a.x_prev);
  T* __restrict__ pred_xstart = static_cast<T*>(a.pred_xstart);
  const int64_t packs = a.batch * a.per_sample / VEC;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < packs;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = k * VEC;
    const int64_t b = i / a.per_sample;
    const DdimSample s = ddim_sample(a.coefs + b * kNumCoefs, a.nonzero[b], GUIDED ? a.scale[b] : 0.f, eta, paper_form);
    float xv[VEC], ev[VEC], gv[VEC], zv[VEC], xp[VEC], xs[VEC];
    load_pack<T, VEC>(x, i, xv);
    load_pack<T, VEC>(eps, i, ev);
    if constexpr (GUIDED) load_pack<T, VEC>(grad, i, gv); else zero_pack<VEC>(gv);
    if constexpr (NOISE) load_pack<T, VEC>(noise, i, zv); else zero_pack<VEC>(zv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (a.clip_denoised) {
        ddim_element<GUIDED, true, NOISE>(s, xv[j], ev[j], gv[j], zv[j], xp[j], xs[j]);
      } else {
        ddim_element<GUIDED, false, NOISE>(s, xv[j], ev[j], gv[j], zv[j], xp[j], xs[j]);
      }
    }
    store_pack<T, VEC>(x_prev, i, xp);
    store_pack<T, VEC>(pred_xstart, i, xs);
  }
}

bool aligned(const void* p, int64_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether the float4-style path can serve `a`: packs stay inside one sample and every access is aligned.
template <typename T>
bool can_vectorise(const UpdateLaunch& a) {
  const int64_t bytes = static_cast<int64_t>(sizeof(T)) * kVec;
  return a.per_sample % kVec == 0 && aligned(a.x, bytes) && aligned(a.eps, bytes) && aligned(a.v, bytes) &&
         aligned(a.grad, bytes) && aligned(a.noise, bytes) && aligned(a.x_prev, bytes) &&
         aligned(a.pred_xstart, bytes);
}

// Enough blocks to fill the device a couple of times over; the grid-stride loop covers the rest.
int grid_size(int64_t work_items) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 80) * (2048 / kThreads) * 2;
  return static_cast<int>(wanted < cap ? wanted : cap);
}

template <typename F>
cudaError_t with_bool(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

template <typename T, int KIND, bool GUIDED>
cudaError_t launch_ddpm(const UpdateLaunch& a, int variance, cudaStream_t stream) {
  const int64_t n = a.batch * a.per_sample;
  if (n == 0) return cudaSuccess;
  if (can_vectorise<T>(a)) {
    guided_ddpm_kernel<T, KIND, GUIDED, kVec><<<grid_size(n / kVec), kThreads, 0, stream>>>(a, variance);
  } else {
    guided_ddpm_kernel<T, KIND, GUIDED, 1><<<grid_size(n), kThreads, 0, stream>>>(a, variance);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_ddpm(const UpdateLaunch& a, int variance, cudaStream_t stream) {
  return with_bool(a.grad != nullptr, [&](auto guided) {
    constexpr bool G = decltype(guided)::value;
    switch (variance_kind(variance)) {
      case kKindLearnedRange: return launch_ddpm<T, kKindLearnedRange, G>(a, variance, stream);
      case kKindLearned: return launch_ddpm<T, kKindLearned, G>(a, variance, stream);
      default: return launch_ddpm<T, kKindFixed, G>(a, variance, stream);
    }
  });
}

template <typename T, bool GUIDED, bool NOISE>
cudaError_t launch_ddim(const UpdateLaunch& a, float eta, bool paper_form, cudaStream_t stream) {
  const int64_t n = a.batch * a.per_sample;
  if (n == 0) return cudaSuccess;
  if (can_vectorise<T>(a)) {
    guided_ddim_kernel<T, GUIDED, NOISE, kVec><<<grid_size(n / kVec), kThreads, 0, stream>>>(a, eta, paper_form);
  } else {
    guided_ddim_kernel<T, GUIDED, NOISE, 1><<<grid_size(n), kThreads, 0, stream>>>(a, eta, paper_form);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_ddim(const UpdateLaunch& a, float eta, bool paper_form, cudaStream_t stream) {
  return with_bool(a.grad != nullptr, [&](auto guided) {
    return with_bool(eta > 0.f, [&](auto noisy) {
      return launch_ddim<T, decltype(guided)::value, decltype(noisy)::value>(a, eta, paper_form, stream);
    });
  });
}

}  // namespace

int launch_guided_ddpm_update(const UpdateLaunch& a, int variance, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case ElemType::kFloat32: return dispatch_ddpm<float>(a, variance, st);
    case ElemType::kFloat16: return dispatch_ddpm<__half>(a, variance, st);
    case ElemType::kBFloat16: return dispatch_ddpm<__nv_bfloat16>(a, variance, st);
  }
  return cudaErrorInvalidValue;
}

int launch_guided_ddim_update(const UpdateLaunch& a, float eta, bool paper_form, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case ElemType::kFloat32: return dispatch_ddim<float>(a, eta, paper_form, st);
    case ElemType::kFloat16: return dispatch_ddim<__half>(a, eta, paper_form, st);
    case ElemType::kBFloat16: return dispatch_ddim<__nv_bfloat16>(a, eta, paper_form, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastguide
