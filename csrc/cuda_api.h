// Raw-pointer launchers of the CUDA kernels (implemented in ops_cuda.cu, called by ops_cuda.cpp).
//
// Free of torch and CUDA headers on purpose: the CPU torch wheel lacks c10/cuda's generated headers, so
// the kernels are compiled by nvcc against this interface alone, and the torch-facing checks,
// allocation and stream handling live in the C++ launcher ops_cuda.cpp.
#pragma once

#include <cstdint>

namespace fastguide {

enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One update over a contiguous (batch, per_sample) block. Tensor pointers are device pointers to
// `dtype` elements; absent optional inputs are nullptr. coefs, scale and nonzero are float32.
struct UpdateLaunch {
  const void* x;
  const void* eps;
  const void* v;      // DDPM learned variances only
  const void* grad;   // nullptr: unguided
  const void* noise;  // DDIM: nullptr when eta == 0
  void* x_prev;
  void* pred_xstart;
  const float* coefs;    // (batch, kNumCoefs)
  const float* scale;    // (batch,), nullptr when unguided
  const float* nonzero;  // (batch,)
  int64_t batch;
  int64_t per_sample;  // elements per sample, C·H·W
  ElemType dtype;
  bool clip_denoised;
};

// Each returns the cudaError_t (as int) of the launch; 0 on success. `stream` is a cudaStream_t.
int launch_guided_ddpm_update(const UpdateLaunch& args, int variance, void* stream);
int launch_guided_ddim_update(const UpdateLaunch& args, float eta, bool paper_form, void* stream);

}  // namespace fastguide
