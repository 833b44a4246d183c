// CUDA implementation of the ops, torch side: checks, device guard, current stream, allocation; the
// kernels themselves are in ops_cuda.cu behind the raw-pointer interface of cuda_api.h. Compiled only
// in CUDA builds (setup.py / CMakeLists.txt with CUDA).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_api.h"
#include "ops.h"

namespace fastguide {
namespace {

ElemType elem_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kHalf: return ElemType::kFloat16;
    case at::kBFloat16: return ElemType::kBFloat16;
    default: TORCH_CHECK(false, "fastguide: unsupported dtype ", dtype);
  }
}

const void* raw(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

UpdateLaunch launch_args(const UpdateInputs& in, at::Tensor& x_prev, at::Tensor& xstart, bool clip) {
  UpdateLaunch a;
  a.x = raw(in.x);
  a.eps = raw(in.eps);
  a.v = raw(in.v);
  a.grad = raw(in.grad);
  a.noise = raw(in.noise);
  a.x_prev = x_prev.mutable_data_ptr();
  a.pred_xstart = xstart.mutable_data_ptr();
  a.coefs = in.coefs.const_data_ptr<float>();
  a.scale = in.scale.defined() ? in.scale.const_data_ptr<float>() : nullptr;
  a.nonzero = in.nonzero.const_data_ptr<float>();
  a.batch = in.batch;
  a.per_sample = in.per_sample;
  a.dtype = elem_type(in.x.scalar_type());
  a.clip_denoised = clip;
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> guided_ddpm_update_cuda(
    const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& v,
    const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& noise, const at::Tensor& coefs, const at::Tensor& nonzero, int64_t variance,
    bool clip_denoised) {
  const UpdateInputs in = check_ddpm_inputs(x, eps, v, grad, scale, noise, coefs, nonzero, variance, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());  // after the checks: x is on a CUDA device
  auto [x_prev, xstart] = new_outputs(in.x);
  const UpdateLaunch a = launch_args(in, x_prev, xstart, clip_denoised);
  C10_CUDA_CHECK(static_cast<cudaError_t>(
      launch_guided_ddpm_update(a, static_cast<int>(variance), c10::cuda::getCurrentCUDAStream().stream())));
  return outputs_like(x, x_prev, xstart);
}

std::tuple<at::Tensor, at::Tensor> guided_ddim_update_cuda(
    const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& noise, const at::Tensor& coefs,
    const at::Tensor& nonzero, double eta, bool clip_denoised, bool paper_form) {
  const UpdateInputs in = check_ddim_inputs(x, eps, grad, scale, noise, coefs, nonzero, eta, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());  // after the checks: x is on a CUDA device
  auto [x_prev, xstart] = new_outputs(in.x);
  const UpdateLaunch a = launch_args(in, x_prev, xstart, clip_denoised);
  C10_CUDA_CHECK(static_cast<cudaError_t>(launch_guided_ddim_update(
      a, static_cast<float>(eta), paper_form, c10::cuda::getCurrentCUDAStream().stream())));
  return outputs_like(x, x_prev, xstart);
}

}  // namespace fastguide

TORCH_LIBRARY_IMPL(fastguide, CUDA, m) {
  m.impl("guided_ddpm_update", &fastguide::guided_ddpm_update_cuda);
  m.impl("guided_ddim_update", &fastguide::guided_ddim_update_cuda);
}
