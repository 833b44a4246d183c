"""ADM's flag strings: parsed as ADM's argparse parses them, into networks and schedules identical to those
ADM's create_model_and_diffusion / create_classifier build from the same string."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from adm_reference import MISSING
from adm_sample_support import SAMPLE_DEFAULTS, adm_args, adm_build

import fastguide as fg
from fastguide.adm.flags import ADM_FLAGS, README_FLAGS, ModelFlags, SampleFlags, parse_flags

needs_adm = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


@needs_adm
def test_defaults_are_adms():
    from guided_diffusion import script_util as su

    assert ADM_FLAGS["model"] == su.model_and_diffusion_defaults()
    assert ADM_FLAGS["classifier"] == su.classifier_defaults()
    assert {k: v for k, v in ADM_FLAGS["sample"].items() if k != "use_entropy_scale"} == SAMPLE_DEFAULTS
    assert ModelFlags(**su.model_and_diffusion_defaults()) == ModelFlags()  # ADM's dict is accepted whole


@needs_adm
@pytest.mark.parametrize("text", [
    "--class_cond True --use_fp16 yes --learn_sigma T --image_size 32 --dropout 0.25 --timestep_respacing ddim25",
    "--class_cond=0 --use_ddim Y --classifier_scale 3 --num_samples 8 --clip_denoised n",
    "--attention_resolutions 16 --channel_mult 1,2,2 --rescale_timesteps TRUE --model_path m.pt",
])  # fmt: skip
def test_parsing_agrees_with_adms_argparse(text):
    want = vars(adm_args(text))
    flags = parse_flags(text)
    got = {**vars(flags.sample)}
    for group in (flags.model, flags.classifier):
        got.update({k: v for k, v in vars(group).items() if k not in group.NOT_ADM})
    for name, value in want.items():
        assert got[name] == value and type(got[name]) is type(value), name


def test_bad_flags_are_named():
    for text, message in [
        ("--num_channel 64", "unknown ADM flag '--num_channel'"),
        ("--class_cond maybe", "--class_cond expects a boolean"),
        ("--image_size 6.4", "--image_size expects int, got '6.4'"),
        ("--image_size 64 --image_size 128", "--image_size is given twice"),
        ("--use_fp16", "--use_fp16 needs a value"),
        ("64", "unknown ADM flag '64'"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_flags(text)
    with pytest.raises(ValueError, match="class_cond must be bool, got 'False'"):
        ModelFlags(class_cond="False")
    with pytest.raises(ValueError, match="batch_size must be int, got True"):
        SampleFlags(batch_size=True)


def test_an_x0_prediction_unet_is_sampled_as_an_eps_model():
    from fastguide.diffusion import XStartToEps

    flags = dataclasses.replace(parse_flags("--predict_xstart True").model, image_size=8, num_channels=32,
                                num_res_blocks=1, attention_resolutions="4", num_head_channels=32, channel_mult="1,2")  # fmt: skip
    net = flags.build()
    wrapped = flags.eps_model(net)
    assert isinstance(wrapped, XStartToEps) and wrapped.net is net
    assert flags.schedule("ddim10").num_steps == 10
    plain = dataclasses.replace(flags, predict_xstart=False)
    assert plain.eps_model(net) is net


@needs_adm
@pytest.mark.parametrize("name", sorted(README_FLAGS))
def test_readme_flags_build_adms_networks_and_schedules(name):
    text = README_FLAGS[name] + " --timestep_respacing 250"
    with torch.device("meta"):  # shapes only: the published sizes are large
        _, model, diffusion, classifier = adm_build(text)
        flags = parse_flags(text)
        ours = flags.model.build(), flags.classifier.build()
    for adm, mine in zip((model, classifier), ours):
        want = {k: v.shape for k, v in adm.state_dict().items()}
        got = {k: v.shape for k, v in mine.state_dict().items()}
        assert got == want
    schedule = flags.model.schedule()
    adm_schedule = fg.Schedule.from_adm(diffusion)
    assert schedule.timestep_map == adm_schedule.timestep_map and schedule.num_steps == 250
    for table in ("alpha_bar", "posterior_variance", "log_beta"):
        assert torch.equal(schedule.table(table), adm_schedule.table(table)), table
    assert fg.adm.accelerate(diffusion).variance == "learned_range"


@needs_adm
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-torso"])
def test_small_flags_build_networks_with_adms_outputs(fp16):
    text = (
        f"--image_size 64 --num_channels 32 --num_res_blocks 1 --attention_resolutions 32 --num_head_channels 16 "
        f"--class_cond True --learn_sigma True --use_fp16 {fp16} --classifier_width 64 --classifier_depth 1 "
        f"--classifier_attention_resolutions 16,8 --classifier_use_fp16 {fp16} --channel_mult 1,2"  # ADM's classifier
        # takes its channel multipliers from the image size, which must be 64 or more
    )
    torch.manual_seed(0)
    _, model, _, classifier = adm_build(text)
    flags = parse_flags(text)
    torch.manual_seed(0)  # the same seeded initialisation draws the same weights: modules are made in ADM's order
    nets = flags.model.build(), flags.classifier.build()
    x, t, y = torch.randn(2, 3, 64, 64), torch.tensor([10, 900]), torch.tensor([3, 999])
    for adm, mine, args in ((model, nets[0], (x, t, y)), (classifier, nets[1], (x, t))):
        if fp16:
            adm.convert_to_fp16()
            mine.convert_to_fp16()
        state = adm.state_dict()
        assert list(mine.state_dict()) == list(state)
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), state.values()))
        with torch.no_grad():
            assert torch.equal(mine.eval()(*args), adm.eval()(*args))
