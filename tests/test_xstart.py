"""x0-prediction networks (ADM's ``--predict_xstart``, ``ModelMeanType.START_X``): trained on ‖x_0 − x̂_0‖²,
sampled as eps-models through XStartToEps, in fastguide's samplers and in ``accelerate(diffusion)``."""

from __future__ import annotations

import pytest
import torch
from adm_reference import MISSING, adm_here
from golden_cases import FOLDERS, golden

import fastguide as fg
from fastguide import ops
from fastguide.diffusion import VToEps, XStartToEps
from fastguide.losses import diffusion_loss, vlb_term

needs_adm = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


class _Const(torch.nn.Module):
    """Returns a fixed output (and records the timesteps it is given)."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out, self.seen = out, []
        self.in_channels, self.image_size = out.shape[1] // 2, out.shape[-1]

    def forward(self, x, t, **kwargs):
        self.seen.append(t)
        return self.out


def _spaced(respacing: str, rescale: bool, mean: str = "START_X"):
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps

    return SpacedDiffusion(use_timesteps=space_timesteps(1000, respacing), betas=gd.get_named_beta_schedule("linear", 1000),
                           model_mean_type=getattr(gd.ModelMeanType, mean), model_var_type=gd.ModelVarType.LEARNED_RANGE,
                           loss_type=gd.LossType.MSE, rescale_timesteps=rescale)  # fmt: skip


@needs_adm
@pytest.mark.parametrize("respacing, rescale", [("1000", False), ("ddim25", False), ("50", True)])
def test_xstart_to_eps_is_adms_predict_eps_from_xstart_bit_for_bit(respacing, rescale):
    diffusion = _spaced(respacing, rescale)
    g = torch.Generator().manual_seed(0)
    x_t, x0 = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 2, 8, 8, generator=g)
    index = torch.tensor([0, 1, 5, diffusion.num_timesteps // 2, diffusion.num_timesteps - 2, diffusion.num_timesteps - 1])
    wrapped = XStartToEps(_Const(x0), fg.Schedule.from_adm(diffusion))
    out = wrapped(x_t, diffusion._scale_timesteps(torch.tensor(diffusion.timestep_map)[index]))
    assert torch.equal(out[:, :1], diffusion._predict_eps_from_xstart(x_t, index, x0[:, :1]))
    assert torch.equal(out[:, 1:], x0[:, 1:])  # the variance channels pass through
    assert wrapped.in_channels == 1 and wrapped.image_size == 8  # the network's attributes show through


def test_xstart_to_eps_at_a_timestep_outside_the_chain_is_nan():
    schedule = fg.Schedule.create("linear", 100, "10")
    wrapped = XStartToEps(_Const(torch.zeros(1, 2, 4, 4)), schedule)
    outside = next(t for t in range(100) if t not in schedule.timestep_map)
    assert wrapped(torch.zeros(1, 1, 4, 4), torch.tensor([outside]))[:, :1].isnan().all()


def test_the_x0_loss_is_the_squared_error_of_x0_and_its_vb_uses_the_networks_x0():
    schedule = fg.Schedule.create("linear", 100)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 3, 50, 99])
    x0_hat, v = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    terms = diffusion_loss(_Const(torch.cat([x0_hat, v], 1)), x0, t, noise, schedule, learn_sigma=True,
                           prediction="x0")  # fmt: skip
    torch.testing.assert_close(terms.mse, ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3)), rtol=0, atol=0)
    # the same bound through the eps an eps-model would have output for this x̂0
    c = fg.schedule.StepCoefficients.of(schedule.coefficients(t))
    x_t = c.alpha_bar.sqrt() * x0 + (1 - c.alpha_bar).sqrt() * noise
    as_eps = vlb_term(fg.diffusion.predict_eps_from_xstart(x_t, x0_hat, c), v, x0, x_t, t, schedule)
    torch.testing.assert_close(terms.vb, as_eps, rtol=1e-4, atol=1e-6)
    # a perfect x0 network has zero mse
    perfect = diffusion_loss(_Const(torch.cat([x0, v], 1)), x0, t, noise, schedule, learn_sigma=True,
                             prediction="x0")  # fmt: skip
    assert perfect.mse.abs().max() == 0


class _Float64Loop(torch.nn.Module):
    """The float32 network inside a float64 loop: the reference for the loop's own arithmetic."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, **kwargs):
        return self.net(x.float(), t, **kwargs).double()


def _run(loop, net, shape, noises, **kwargs):
    """ADM's loop with the recorded per-step noise (torch.randn / randn_like pop it, in the loop's dtype)."""
    queue = list(noises)

    def draw(*args, **kw):
        like = args[0] if args and isinstance(args[0], torch.Tensor) else None
        dtype = like.dtype if like is not None else kw.get("dtype", torch.float32)
        return queue.pop(0).to(dtype) if queue else torch.zeros(like.shape if like is not None else args, dtype=dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "randn", draw)
        mp.setattr(torch, "randn_like", draw)
        return [s["sample"] for s in loop(net, shape, **kwargs)]


@needs_adm
@pytest.mark.parametrize("folder", FOLDERS[:1])
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
@pytest.mark.parametrize("guided", [False, True])
def test_accelerated_x0_model_meets_the_float64_rule_against_adms_start_x_loop(folder, method, guided):
    """An x0-prediction network (the golden folder's UNet read as x̂0) through accelerate(diffusion): every
    step within 2× ADM's own float32 error (+1e-6) of ADM's START_X loop run in float64 around the same
    float32 network; the x0 → ε → x0 round trip costs no more than ADM's arithmetic does."""
    g = golden(folder)
    adm = adm_here(g)
    diffusion = _spaced("ddim10" if method == "ddim" else "25", False)
    shape = tuple(g.x_T.shape)
    net = adm.unets["cond"]
    noises = [g.x_T.double()] + [torch.randn(shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
                                 for k in range(diffusion.num_timesteps)]  # fmt: skip

    def cond_fn(x, t, y=None):  # a smooth guidance field, in the loop's dtype
        return -0.5 * torch.tanh(x) * (1 + y.view(-1, 1, 1, 1).to(x.dtype) / 10)

    kwargs = dict(model_kwargs={"y": g.y}, cond_fn=cond_fn if guided else None, noise=None)
    adm_loop = diffusion.p_sample_loop_progressive if method == "ddpm" else diffusion.ddim_sample_loop_progressive
    fast = fg.adm.accelerate(diffusion)
    fast_loop = fast.p_sample_loop_progressive if method == "ddpm" else fast.ddim_sample_loop_progressive
    with torch.no_grad():
        want = _run(adm_loop, _Float64Loop(net), shape, noises, **kwargs)
        ref32 = _run(adm_loop, net, shape, noises, **kwargs)
        with ops.use_backend("torch"):
            got = _run(fast_loop, net, shape, noises, **kwargs)
    assert len(got) == len(want) == diffusion.num_timesteps
    for k, (a, r, w) in enumerate(zip(got, ref32, want)):
        scale = w.abs().max().item()
        err, ref_err = (a.double() - w).abs().max().item() / scale, (r.double() - w).abs().max().item() / scale
        assert err <= 2 * ref_err + 1e-6, f"step {k}: error against float64 {err:.3g} > 2 × ADM float32's {ref_err:.3g}"


def test_the_v_loss_is_the_same_for_an_x0_network_and_the_eps_network_it_equals():
    """‖v − v̂‖² does not depend on what the network predicts: x̂0 and the ε̂ it implies give the same loss,
    and that loss is ‖x0 − x̂0‖²/(1 − ᾱ_t), computed here in float64."""
    schedule = fg.Schedule.create("linear", 1000)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1, torch.randn(5, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 300, 700, 999])
    x0_hat = x0 + 0.1 * torch.randn(5, 1, 8, 8, generator=g)
    c = fg.schedule.StepCoefficients.of(schedule.coefficients(t))
    x_t = fg.losses.q_sample(x0, t, noise, schedule)
    eps_hat = fg.diffusion.predict_eps_from_xstart(x_t, x0_hat, c)
    as_x0 = diffusion_loss(_Const(x0_hat), x0, t, noise, schedule, prediction="x0", v_loss=True).mse
    as_eps = diffusion_loss(_Const(eps_hat), x0, t, noise, schedule, v_loss=True).mse
    alpha_bar = schedule.table("alpha_bar")[t]
    want = ((x0 - x0_hat).double() ** 2).mean(dim=(1, 2, 3)) / (1 - alpha_bar)
    torch.testing.assert_close(as_x0.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(as_eps.double(), want, rtol=2e-3, atol=0)  # ε̂ from x̂0 in float32: ~1e-4 relative
    plain = diffusion_loss(_Const(x0_hat), x0, t, noise, schedule, prediction="x0").mse
    assert (as_x0[:2] > 1000 * plain[:2]).all() and torch.allclose(as_x0[-1], plain[-1], rtol=1e-3)


def test_a_v_network_is_trained_on_v_and_sampled_as_the_eps_it_implies():
    """The true v gives the true ε through VToEps, zero v-loss, and the x̂0 the vb term uses is x0."""
    schedule = fg.Schedule.create("linear", 1000)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1, torch.randn(5, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 300, 700, 999])
    ab = schedule.table("alpha_bar")[t].reshape(-1, 1, 1, 1)
    v = (ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()).float()
    x_t = fg.losses.q_sample(x0, t, noise, schedule)
    var = torch.zeros_like(x0)
    eps = VToEps(_Const(torch.cat([v, var], 1)), schedule)(x_t, t)[:, :1]
    torch.testing.assert_close(eps, noise, rtol=0, atol=1e-5)
    terms = diffusion_loss(_Const(torch.cat([v, var], 1)), x0, t, noise, schedule, learn_sigma=True, prediction="v")
    assert terms.mse.max() < 1e-12
    c = fg.schedule.StepCoefficients.of(schedule.coefficients(t))
    torch.testing.assert_close(fg.losses.xstart_from_prediction("v", x_t, v, c), x0, rtol=0, atol=1e-5)
    # v̂ off by δ costs ‖δ‖², the same as the v-loss of the x̂0 network with the same x̂0
    v_hat = v + 0.1 * torch.randn(v.shape, generator=g)
    as_v = diffusion_loss(_Const(v_hat), x0, t, noise, schedule, prediction="v").mse
    x0_hat = fg.losses.xstart_from_prediction("v", x_t, v_hat, c)
    as_x0 = diffusion_loss(_Const(x0_hat), x0, t, noise, schedule, prediction="x0", v_loss=True).mse
    torch.testing.assert_close(as_v, ((v_hat - v) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(as_x0, as_v, rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="prediction must be one of"):
        diffusion_loss(_Const(v_hat), x0, t, noise, schedule, prediction="score")


def test_predict_v_builds_a_v_view_and_is_not_an_adm_flag():
    from fastguide.adm.networks.configs import ModelFlags
    from fastguide.adm.flags import ADM_FLAGS

    assert "predict_v" not in ADM_FLAGS["model"]
    flags = ModelFlags(image_size=32, num_channels=32, channel_mult="1,2", num_res_blocks=1, predict_v=True)
    assert flags.prediction == "v" and isinstance(flags.eps_model(torch.nn.Identity()), VToEps)
    with pytest.raises(ValueError, match="predict_xstart and predict_v are both set"):
        ModelFlags(predict_xstart=True, predict_v=True)
