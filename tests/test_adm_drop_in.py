"""fastguide inside ADM's own code (guided-diffusion-sdk, the test-only dependency): fastguide's cond_fn in
ADM's loops, and ADM's loops replaced by ``accelerate(diffusion)``."""

from __future__ import annotations

import dataclasses
import types
import warnings

import pytest
import torch
from adm_reference import MISSING, adm_here
from golden_cases import FOLDERS, _trajectory_cases, check_trajectory_against_float64, golden

import fastguide as fg
from fastguide import ops

pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


@pytest.mark.parametrize("folder, method, model, guidance", _trajectory_cases())
def test_fastguides_cond_fn_in_adms_own_loop_gives_the_golden_trajectories(folder, method, model, guidance):
    g = golden(folder)
    adm = adm_here(g)
    policy = g.policy(guidance)
    cond_fn = fg.adm.cond_fn(g.classifier, policy, adm.diffusion(method), record=True)
    prefix = f"{method}_{model}_{guidance}"
    steps = adm.loop(method, model, cond_fn, prefix)
    result = types.SimpleNamespace(
        images=steps[-1], trace=types.SimpleNamespace(scale=torch.stack([r.scale for r in cond_fn.records]))
    )
    if g.f64 is None:
        pytest.skip(f"{folder} has no float64 reference")
    check_trajectory_against_float64(g, prefix, list(steps), result, record=False)


def adm_cond_fn(adm, scale: float):
    """scripts/classifier_sample.py's cond_fn."""

    def cond_fn(x, t, y=None):
        return adm._log_probs_and_grad(x, t, y)[1] * scale

    return cond_fn


def _loops(diffusion, method: str):
    return (diffusion.p_sample_loop, diffusion.p_sample_loop_progressive) if method == "ddpm" else (
        diffusion.ddim_sample_loop, diffusion.ddim_sample_loop_progressive)  # fmt: skip


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
@pytest.mark.parametrize("model", ["uncond", "cond"])
def test_accelerate_returns_adms_samples_for_the_same_seed_bit_for_bit(folder, method, model):
    """ADM's cond_fn, ADM's networks, torch's global generator: the torch backend gives ADM's samples
    bit for bit, and leaves the generator where ADM leaves it (the next batch's classes and x_T agree)."""
    g = golden(folder)
    adm = adm_here(g)
    diffusion = adm.diffusion(method)
    fast = fg.adm.accelerate(diffusion)
    net, shape = adm.unets[model], tuple(g.x_T.shape)
    kwargs = dict(cond_fn=adm_cond_fn(adm, 3.0), model_kwargs={"y": g.y})
    results = []
    for loop, progressive in (_loops(diffusion, method), _loops(fast, method)):
        torch.manual_seed(7)
        with ops.use_backend("torch"):
            final = loop(net, shape, **kwargs)
            steps = list(progressive(net, shape, **kwargs))
        results.append((final, steps, torch.randn(4)))
    (want, want_steps, want_next), (got, got_steps, got_next) = results
    assert torch.equal(got, want)
    assert len(got_steps) == len(want_steps) == diffusion.num_timesteps
    for a, b in zip(got_steps, want_steps):
        assert a.keys() == b.keys() == {"sample", "pred_xstart"}
        assert torch.equal(a["sample"], b["sample"])
        # DDPM guides the mean: x̂0 is the model's own. Guided DDIM's x̂0 is the guided one, as openai's
        # ddim_sample yields it; guided-diffusion-sdk's yields the unguided one (out_orig), so not compared
        if method == "ddpm":
            assert torch.equal(a["pred_xstart"], b["pred_xstart"])
    assert torch.equal(got_next, want_next)


@pytest.mark.parametrize("folder", FOLDERS)
def test_accelerate_unguided_ddim_yields_adms_pred_xstart(folder):
    g = golden(folder)
    diffusion = adm_here(g).diffusion("ddim")
    fast = fg.adm.accelerate(diffusion)
    net, shape = adm_here(g).unets["cond"], tuple(g.x_T.shape)
    with ops.use_backend("torch"):
        want = list(diffusion.ddim_sample_loop_progressive(net, shape, noise=g.x_T, model_kwargs={"y": g.y}))
        got = list(fast.ddim_sample_loop_progressive(net, shape, noise=g.x_T, model_kwargs={"y": g.y}))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["sample"], b["sample"]) and torch.equal(a["pred_xstart"], b["pred_xstart"])


@pytest.mark.parametrize("folder, method, model, guidance", _trajectory_cases())
def test_accelerate_with_fastguides_cond_fn_meets_the_float64_rule(folder, method, model, guidance):
    """accelerate(diffusion) given fastguide's cond_fn runs the fused guided step: the golden trajectories
    from the folder's x_T and recorded noise, under the float64 rule."""
    g = golden(folder)
    if g.f64 is None:
        pytest.skip(f"{folder} has no float64 reference")
    adm = adm_here(g)
    diffusion = adm.diffusion(method)
    fast = fg.adm.accelerate(diffusion)
    prefix = f"{method}_{model}_{guidance}"
    cond_fn = fg.adm.cond_fn(g.classifier, g.policy(guidance), diffusion)
    recorded = list(g.ref.get(f"{prefix}_noise", []))
    randn = torch.randn

    def noise(*shape, **kwargs):  # the recorded DDPM noise, in ADM's order
        return recorded.pop(0).clone() if recorded else randn(*shape, **kwargs)

    loop = fast.p_sample_loop_progressive if method == "ddpm" else fast.ddim_sample_loop_progressive
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "randn", noise)
        outs = list(loop(adm.unets[model], tuple(g.x_T.shape), noise=g.x_T.clone(), cond_fn=cond_fn,
                         model_kwargs={"y": g.y}))  # fmt: skip
    sampler = next(iter(fast._samplers.values()))[2]
    assert isinstance(sampler.policy, type(g.policy(guidance)))  # the fused path, not the generic cond_fn one
    # the scales come from the sampler's own trace: rerun through GuidedSampler.sample for them
    result = sampler.sample(g.y, noise=fg.FixedNoise(g.x_T, g.ref.get(f"{prefix}_noise")))
    check_trajectory_against_float64(g, prefix, [o["sample"] for o in outs], result, record=False)


def test_accelerate_reads_the_diffusion_object_and_passes_the_rest_through():
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps

    betas = gd.get_named_beta_schedule("cosine", 1000)
    spaced = SpacedDiffusion(use_timesteps=space_timesteps(1000, "ddim25"), betas=betas,
                             model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
                             loss_type=gd.LossType.MSE, rescale_timesteps=True)  # fmt: skip
    fast = fg.adm.accelerate(spaced)
    want = fg.Schedule.create("cosine", 1000, "ddim25", rescale_timesteps=True)
    assert fast.schedule.timestep_map == want.timestep_map
    assert fast.schedule.rescale_timesteps and fast.variance == "learned_range"
    torch.testing.assert_close(fast.schedule.table("alpha_bar"), want.table("alpha_bar"), rtol=1e-12, atol=0)
    assert fast.num_timesteps == 25 and fast.training_losses == spaced.training_losses  # ADM's own
    assert fg.adm.accelerate(fast) is fast
    plain = gd.GaussianDiffusion(betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
                                 model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE)  # fmt: skip
    assert fg.adm.accelerate(plain).schedule.timestep_map == tuple(range(1000))
    assert fg.adm.accelerate(plain).variance == "fixed_small"
    x0 = gd.GaussianDiffusion(betas=betas, model_mean_type=gd.ModelMeanType.START_X,
                              model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE)  # fmt: skip
    assert fg.adm.accelerate(x0).predict_xstart  # sampled through XStartToEps (tests/test_xstart.py)
    prev = gd.GaussianDiffusion(betas=betas, model_mean_type=gd.ModelMeanType.PREVIOUS_X,
                                model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE)  # fmt: skip
    with pytest.raises(ValueError, match="PREVIOUS_X: fastguide samples eps- and x0-prediction models"):
        fg.adm.accelerate(prev)
    with pytest.raises(TypeError, match="not an ADM diffusion object"):
        fg.adm.accelerate(object())


def test_unsupported_loop_arguments_are_errors_naming_them():
    g = golden(FOLDERS[0].values[0])
    fast = fg.adm.accelerate(adm_here(g).diffusion("ddim"))
    net, shape = g.unets["cond"], tuple(g.x_T.shape)
    with pytest.raises(ValueError, match="denoised_fn is not supported"):
        fast.ddim_sample_loop(net, shape, denoised_fn=lambda x: x, model_kwargs={"y": g.y})
    with pytest.raises(ValueError, match=r"model_kwargs\['low_res'\] must be a tensor with one row per sample \(4\), got \(1, 3"):
        fast.ddim_sample_loop(net, shape, model_kwargs={"y": g.y, "low_res": g.x_T[:1]})
    with pytest.raises(ValueError, match="cond_fn needs the target classes"):
        fg.adm.eds_cond_fn(g.classifier, 1.0)(g.x_T, torch.zeros(len(g.y), dtype=torch.long))


def test_cond_fn_sees_original_timesteps_when_adm_rescales_them():
    seen = []

    def policy(state):
        seen.append(state.t.clone())
        return torch.ones_like(state.entropy)

    clf = golden(FOLDERS[0].values[0]).classifier
    fn = fg.adm.cond_fn(clf, policy, num_timesteps=4000, rescale_timesteps=True)
    x = torch.randn(2, 3, clf.image_size, clf.image_size)
    fn(x, torch.tensor([999.75, 0.25]), y=torch.tensor([0, 1]))
    assert seen[0].tolist() == [3999, 1]
    const = fg.adm.cond_fn(clf, 2.5)
    assert const.policy == fg.Constant(2.5)


def test_the_readmes_adm_lines_run_in_an_adm_script():
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Using fastguide in an ADM codebase")[1].split("\n## ")[0]
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(python) == 2
    g = golden(FOLDERS[0].values[0])
    adm = adm_here(g)
    names = {"fastguide": fg, "classifier": adm.classifier, "diffusion": adm.diffusion("ddim"),
             "args": types.SimpleNamespace(classifier_scale=2.0)}  # fmt: skip
    for block in python:  # classifier_sample.py's names, then the README's lines
        exec(compile(block, "README.md", "exec"), names)
    assert isinstance(names["diffusion"], fg.adm.AcceleratedDiffusion)
    assert names["cond_fn"].policy == fg.EntropyDriven(2.0)
    shape = tuple(g.x_T.shape)
    sample = names["diffusion"].ddim_sample_loop(adm.unets["cond"], shape, cond_fn=names["cond_fn"],
                                                 model_kwargs={"y": g.y})  # fmt: skip
    assert sample.shape == shape and torch.isfinite(sample).all()
    # the adm-sample example's flag strings are the 256x256 ones of guided-diffusion's README
    bash = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    strings = dict(re.findall(r'^(\w+_FLAGS)="(.*)"$', bash, flags=re.M))
    flags = fg.adm.parse_flags(f"{strings['MODEL_FLAGS']} {strings['CLASSIFIER_FLAGS']} {strings['SAMPLE_FLAGS']}")
    published = fg.adm.parse_flags(fg.adm.flags.README_FLAGS["256x256"])
    assert flags.model == dataclasses.replace(published.model, timestep_respacing="ddim25")
    assert flags.classifier == published.classifier and flags.sample.use_ddim
    assert "adm-sample" in shlex.split(bash.replace("\\\n", " "))


@pytest.mark.parametrize("folder, method, model, guidance",
                         [c for c in _trajectory_cases() if c.values[3] == "constant"])  # fmt: skip
def test_an_adm_script_accelerated_and_compiled_is_one_graph_and_meets_the_float64_rule(
    folder, method, model, guidance, monkeypatch
):
    """The one-line change with the fast path on: ADM's own cond_fn and networks inside fastguide's compiled
    step (one graph, no recompilation, no eager fallback), every step under the float64 rule."""
    from golden_cases import assert_float64_parity, here_runs

    g = golden(folder)
    if g.f64 is None:
        pytest.skip(f"{folder} has no float64 reference")
    monkeypatch.setenv("FASTGUIDE_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    adm = adm_here(g)
    fast = fg.adm.accelerate(adm.diffusion(method), fg.SamplerConfig(compile=True))
    prefix = f"{method}_{model}_{guidance}"
    recorded = list(g.ref.get(f"{prefix}_noise", []))
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *s, **k: recorded.pop(0).clone() if recorded else randn(*s, **k))
    loop = fast.p_sample_loop_progressive if method == "ddpm" else fast.ddim_sample_loop_progressive
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("error")  # an eager fallback would warn
        steps = [out["sample"] for out in loop(adm.unets[model], tuple(g.x_T.shape), noise=g.x_T.clone(),
                                               cond_fn=adm_cond_fn(adm, g.meta["gamma"]), model_kwargs={"y": g.y})]  # fmt: skip
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    runs = {"recorded": g.ref, **{name: run.trajectory(method, model, guidance) for name, run in here_runs(g).items()}}
    key = f"{prefix}_traj" if f"{prefix}_traj" in g.f64 else None
    if key:
        for k, x in enumerate(steps):
            refs = {name: run[key][k] for name, run in runs.items() if key in run}
            assert_float64_parity(f"{prefix} step {k}", x, g.f64[key][k], refs, record=False)
    refs = {name: run.get(f"{prefix}_x0") for name, run in runs.items()}
    assert_float64_parity(f"{prefix}_x0", steps[-1], g.f64[f"{prefix}_x0"], refs, record=False)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_cond_fn_in_adms_loop_with_rescaled_timesteps_matches_accelerate(method):
    """T = 4000 and rescale_timesteps: ADM hands cond_fn t·1000/T; the policy (timestep-aware, which reads t)
    must see original timesteps, as fastguide's own loop gives them."""
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps

    g = golden(FOLDERS[0].values[0])
    adm = adm_here(g)
    diffusion = SpacedDiffusion(use_timesteps=space_timesteps(4000, "8"), betas=gd.get_named_beta_schedule("linear", 4000),
                                model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
                                loss_type=gd.LossType.MSE, rescale_timesteps=True)  # fmt: skip
    policy = fg.TimestepAware(0.002)
    ours = fg.adm.cond_fn(g.classifier, policy, diffusion, record=True)
    net, shape, kw = adm.unets["cond"], tuple(g.x_T.shape), dict(noise=g.x_T, model_kwargs={"y": g.y})
    fast = fg.adm.accelerate(diffusion)
    results = []
    for loop in (diffusion.ddim_sample_loop, fast.ddim_sample_loop) if method == "ddim" else (
            diffusion.p_sample_loop, fast.p_sample_loop):  # fmt: skip
        torch.manual_seed(3)
        results.append(loop(net, shape, cond_fn=ours, **kw))
    seen = [int(r.t[0]) for r in ours.records[: diffusion.num_timesteps]]
    assert seen == sorted(diffusion.timestep_map, reverse=True)  # original timesteps, up to 3999
    assert max(seen) > 1000
    # the two loops round differently; how far rounding-sized differences grow along this chain is measured
    # by ADM's own loop from x_T moved by one float32 ulp (relative 2^-23): the bound is a multiple of that
    torch.manual_seed(3)
    nudged = (diffusion.ddim_sample_loop if method == "ddim" else diffusion.p_sample_loop)(
        net, shape, cond_fn=ours, noise=g.x_T * (1 + 2**-23), model_kwargs={"y": g.y})
    scale = results[0].abs().max()
    diff, growth = (results[0] - results[1]).abs().max() / scale, (results[0] - nudged).abs().max() / scale
    assert diff <= 16 * growth + 1e-6, (
        f"ADM's loop with fastguide's cond_fn and fastguide's loop differ by {diff:.2g}; a one-ulp change of "
        f"x_T moves ADM's own result by {growth:.2g}")
