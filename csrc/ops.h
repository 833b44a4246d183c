// Torch-facing pieces of fastguide._C shared by the CPU and CUDA implementations: input checks,
// output allocation, and the per-device entry points registered under torch.ops.fastguide.
//
// The ops' contracts are those of kernels/reference.py (guided_ddpm_update_ref, guided_ddim_update_ref).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastguide {

// Checked inputs of one update: contiguous, on x's device; x, eps, v, grad, noise share x's dtype;
// coefs (B, kNumCoefs), scale (B,) and nonzero (B,) are float32. Absent optionals stay undefined.
struct UpdateInputs {
  at::Tensor x, eps, v, grad, scale, noise, coefs, nonzero;
  int64_t batch = 0;       // B
  int64_t per_sample = 0;  // C·H·W
};

// Raises (TORCH_CHECK, naming the op, the argument and the bad shape/dtype/device) unless the inputs
// meet the contract on `device_type`; returns them made contiguous.
UpdateInputs check_ddpm_inputs(const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& v,
                               const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& noise, const at::Tensor& coefs,
                               const at::Tensor& nonzero, int64_t variance, c10::DeviceType device_type);

UpdateInputs check_ddim_inputs(const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& grad,
                               const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& noise,
                               const at::Tensor& coefs, const at::Tensor& nonzero, double eta,
                               c10::DeviceType device_type);

// The two outputs (x_prev, pred_xstart), contiguous like x, for a kernel to write into.
std::tuple<at::Tensor, at::Tensor> new_outputs(const at::Tensor& x_contiguous);

// The outputs in the layout of at::empty_like(x), the layout the fake implementation promises.
std::tuple<at::Tensor, at::Tensor> outputs_like(const at::Tensor& x, at::Tensor x_prev, at::Tensor pred_xstart);

std::tuple<at::Tensor, at::Tensor> guided_ddpm_update_cpu(
    const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& v,
    const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& noise, const at::Tensor& coefs, const at::Tensor& nonzero, int64_t variance,
    bool clip_denoised);

std::tuple<at::Tensor, at::Tensor> guided_ddim_update_cpu(
    const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& noise, const at::Tensor& coefs,
    const at::Tensor& nonzero, double eta, bool clip_denoised, bool paper_form);

}  // namespace fastguide
