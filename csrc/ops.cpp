// Schemas of the fastguide ops (TORCH_LIBRARY) and the input checks every device implementation runs.
#include "ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

#include "step_math.h"

namespace fastguide {
namespace {

void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
              t.device());
}

// A small per-sample tensor (coefs, scale, nonzero): checked, then float32 and contiguous.
at::Tensor per_sample_float(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                            at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, " (one row per sample of x ",
              x.sizes(), "), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
              t.device());
  return t.to(at::kFloat).contiguous();
}

// Checks shared by both updates: x itself, eps, guidance pair, coefs and nonzero.
UpdateInputs check_common(const char* op, const at::Tensor& x, const at::Tensor& eps,
                          const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& scale,
                          const at::Tensor& coefs, const at::Tensor& nonzero, c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, op, ": the ", c10::DeviceTypeName(device_type),
              " implementation got x on ", x.device(), " (are the inputs on mixed devices?)");
  TORCH_CHECK(x.dim() == 4, op, ": x must be (B, C, H, W), got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(grad.has_value() == scale.has_value(), op,
              ": grad and scale must both be given (guided) or both be None (unguided)");
  UpdateInputs in;
  in.batch = x.size(0);
  in.per_sample = in.batch == 0 ? 0 : x.numel() / in.batch;
  check_like_x(op, "eps", eps, x);
  in.x = x.contiguous();
  in.eps = eps.contiguous();
  if (grad.has_value()) {
    check_like_x(op, "grad", *grad, x);
    in.grad = grad->contiguous();
    in.scale = per_sample_float(op, "scale", *scale, x, {in.batch});
  }
  in.coefs = per_sample_float(op, "coefs", coefs, x, {in.batch, kNumCoefs});
  in.nonzero = per_sample_float(op, "nonzero", nonzero, x, {in.batch});
  return in;
}

}  // namespace

UpdateInputs check_ddpm_inputs(const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& v,
                               const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& noise, const at::Tensor& coefs,
                               const at::Tensor& nonzero, int64_t variance, c10::DeviceType device_type) {
  constexpr const char* op = "fastguide::guided_ddpm_update";
  TORCH_CHECK(variance >= kLearnedRange && variance <= kFixedLarge, op, ": variance must be a code of ",
              "kernels.reference.VARIANCE_CODES (0 learned_range, 1 learned, 2 fixed_small, 3 fixed_large), got ",
              variance);
  UpdateInputs in = check_common(op, x, eps, grad, scale, coefs, nonzero, device_type);
  TORCH_CHECK(noise.has_value(), op, ": noise is required (shape of x)");
  check_like_x(op, "noise", *noise, x);
  in.noise = noise->contiguous();
  if (variance == kLearnedRange || variance == kLearned) {
    TORCH_CHECK(v.has_value(), op, ": variance ", variance == kLearned ? "learned" : "learned_range",
                " needs v, the model's variance output (shape of x)");
    check_like_x(op, "v", *v, x);
    in.v = v->contiguous();
  }
  return in;
}

UpdateInputs check_ddim_inputs(const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& grad,
                               const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& noise,
                               const at::Tensor& coefs, const at::Tensor& nonzero, double eta,
                               c10::DeviceType device_type) {
  constexpr const char* op = "fastguide::guided_ddim_update";
  TORCH_CHECK(std::isfinite(eta) && eta >= 0, op, ": eta must be finite and >= 0, got ", eta);
  UpdateInputs in = check_common(op, x, eps, grad, scale, coefs, nonzero, device_type);
  if (eta > 0) {
    TORCH_CHECK(noise.has_value(), op, ": noise is required when eta > 0 (eta = ", eta, ")");
    check_like_x(op, "noise", *noise, x);
    in.noise = noise->contiguous();
  }
  return in;
}

std::tuple<at::Tensor, at::Tensor> new_outputs(const at::Tensor& x_contiguous) {
  return {at::empty(x_contiguous.sizes(), x_contiguous.options()),
          at::empty(x_contiguous.sizes(), x_contiguous.options())};
}

std::tuple<at::Tensor, at::Tensor> outputs_like(const at::Tensor& x, at::Tensor x_prev, at::Tensor pred_xstart) {
  if (x.is_contiguous()) return {std::move(x_prev), std::move(pred_xstart)};
  at::Tensor a = at::empty_like(x);
  if (a.is_contiguous()) return {std::move(x_prev), std::move(pred_xstart)};
  at::Tensor b = at::empty_like(x);
  a.copy_(x_prev);  // x is dense in another order (e.g. channels_last): keep its layout
  b.copy_(pred_xstart);
  return {a, b};
}

}  // namespace fastguide

// fake (meta) implementations are registered from Python, in fastguide/_ext.py
TORCH_LIBRARY(fastguide, m) {
  m.set_python_module("fastguide._ext");
  m.def(
      "guided_ddpm_update(Tensor x, Tensor eps, Tensor? v, Tensor? grad, Tensor? scale, Tensor? noise, "
      "Tensor coefs, Tensor nonzero, int variance, bool clip_denoised) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "guided_ddim_update(Tensor x, Tensor eps, Tensor? grad, Tensor? scale, Tensor? noise, Tensor coefs, "
      "Tensor nonzero, float eta, bool clip_denoised, bool paper_form) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
