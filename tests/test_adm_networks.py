"""ADM-compatible networks: attention equals ADM's einsum form, every variant builds and round-trips,
published configurations have ADM's shapes, and checkpoints load without unpickling code."""

import math
import pathlib

import pytest
import torch

from fastguide.adm import (
    PUBLISHED_CLASSIFIERS,
    PUBLISHED_UNETS,
    EncoderUNetModel,
    UNetModel,
    adm_classifier,
    adm_unet,
    load_checkpoint,
    load_state_dict,
)
from fastguide.adm.networks.nn import qkv_attention


def adm_attention_oracle(qkv: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    """ADM's QKVAttention(Legacy) written out with einsum, in float64."""
    qkv = qkv.double()
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (z.reshape(bs * heads, ch, length) for z in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("heads, ch, length", [(1, 8, 5), (4, 16, 17), (3, 32, 64)])
def test_sdpa_attention_equals_adm_einsum(legacy, heads, ch, length):
    qkv = torch.randn(2, 3 * heads * ch, length, generator=torch.Generator().manual_seed(0))
    expected = adm_attention_oracle(qkv, heads, legacy)
    torch.testing.assert_close(qkv_attention(qkv, heads, legacy).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_low_precision_attention_keeps_adms_form_within_its_rounding(legacy, dtype):
    """Compiled with bf16/fp16 activations, the attention is ADM's form (matmuls in the networks' dtype, the
    softmax in float32) rather than SDPA, which inductor would upcast to float32 matmuls on the CPU. Its error
    against float64 is bounded by the rounding of the logits and of the weights, in units of the dtype's eps."""
    heads, ch, length = 4, 32, 64
    qkv = torch.randn(2, 3 * heads * ch, length, generator=torch.Generator().manual_seed(0)).to(dtype)
    compiled = torch.compile(qkv_attention, backend="aot_eager", fullgraph=True, dynamic=False)
    out = compiled(qkv, heads, legacy)
    assert out.dtype == dtype
    expected = adm_attention_oracle(qkv, heads, legacy)
    eps = torch.finfo(dtype).eps  # (half its spacing: the unit roundoff is eps / 2)
    x = qkv.double()
    if legacy:
        q, k, v = x.reshape(2 * heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (z.reshape(2 * heads, ch, length) for z in x.chunk(3, dim=1))
    logit_max = torch.einsum("bct,bcs->bts", q, k).abs().max().item() / math.sqrt(ch)
    # q·scale, k·scale and the logits rounded (relative eps each: 3·L·eps on a logit, twice that on the
    # softmax), each weight rounded (eps of max|v|), each output rounded (eps of |out|)
    bound = eps * v.abs().max().item() * (1 + 6 * logit_max) + eps * expected.abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= bound, (err, bound)
    # and, as the float64 rule judges trajectories: within a few times the error of eager SDPA on the same
    # low-precision inputs (one rounding of the output, float32 inside)
    eager = (qkv_attention(qkv, heads, legacy).double() - expected).abs().max().item()
    assert err <= 4 * eager + eps * expected.abs().max().item() / 2, (err, eager)
    assert err > 0  # (it is computed in the low precision: the test would notice a float32 path)
    torch._dynamo.reset()


def test_attention_orders_differ():
    qkv = torch.randn(1, 3 * 2 * 8, 6)
    assert not torch.allclose(qkv_attention(qkv, 2, True), qkv_attention(qkv, 2, False))


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _tiny_unet(**kw):
    args = dict(
        image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
        attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
    )  # fmt: skip
    args.update(kw)
    return UNetModel(**args)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"use_new_attention_order": True},
        {"resblock_updown": True, "use_scale_shift_norm": True},
        {"num_classes": 7},
        {"out_channels": 6},
        {"conv_resample": False, "num_head_channels": -1, "num_heads": 2},
        {"channel_mult": (0.5, 1, 2), "model_channels": 64},
    ],
)
def test_unet_variants_run_and_round_trip(tmp_path, kw):
    model = _randomise(_tiny_unet(**kw))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    y = torch.tensor([1, 6]) if "num_classes" in kw else None
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, model.out_channels, 16, 16) and torch.isfinite(out).all()
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    clone = load_checkpoint(_tiny_unet(**kw), tmp_path / "m.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(clone(x, t, y), out)


def test_class_conditional_unet_uses_labels_and_requires_them():
    model = _randomise(_tiny_unet(num_classes=3))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        assert not torch.allclose(model(x, t, torch.tensor([0])), model(x, t, torch.tensor([2])))
    with pytest.raises(ValueError, match="num_classes=3"):
        model(x, t)


@pytest.mark.parametrize("pool", EncoderUNetModel.POOLS)
def test_every_encoder_pool(pool):
    model = _randomise(
        EncoderUNetModel(16, 3, 32, 10, 1, (2,), channel_mult=(1, 2), num_head_channels=16, pool=pool,
                         resblock_updown=True, use_scale_shift_norm=True)
    )  # fmt: skip
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        logits = model(x, torch.tensor([0, 400, 999]))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    keys = model.state_dict().keys()
    expected = {
        "adaptive": "out.3.weight",
        "attention": "out.2.positional_embedding",
        "spatial": "out.2.weight",
        "spatial_v2": "out.1.weight",
    }[pool]
    assert expected in keys


def test_unknown_pool_is_named():
    with pytest.raises(ValueError, match="'max'"):
        EncoderUNetModel(16, 3, 32, 10, 1, (), channel_mult=(1,), pool="max")


def _meta_build(fn, *args, **kw):
    with torch.device("meta"):
        return fn(*args, **kw)


# shapes that follow from ADM's published flags (guided-diffusion README / script_util)
@pytest.mark.parametrize(
    "size, key, shape",
    [
        (64, "label_emb.weight", (1000, 768)),  # 192 channels * 4
        (64, "input_blocks.0.0.weight", (192, 3, 3, 3)),
        (64, "out.2.weight", (6, 192, 3, 3)),  # learned sigma
        (128, "input_blocks.0.0.weight", (256, 3, 3, 3)),
        (128, "middle_block.1.qkv.weight", (3072, 1024, 1)),  # channel_mult (1,1,2,3,4) -> 4 * 256
        (256, "input_blocks.17.0.out_layers.3.weight", (1024, 1024, 3, 3)),  # 1 + 6 * 2 + 5 = 18 blocks
        (512, "input_blocks.0.0.weight", (128, 3, 3, 3)),  # channel_mult starts at 0.5
        (512, "out.2.weight", (6, 128, 3, 3)),
    ],
)
def test_published_unet_shapes(size, key, shape):
    state = _meta_build(adm_unet, size).state_dict()
    assert tuple(state[key].shape) == shape


def test_published_unconditional_unet_has_no_label_embedding():
    assert "label_emb.weight" not in _meta_build(adm_unet, 256, class_cond=False).state_dict()
    assert set(PUBLISHED_UNETS) == {64, 128, 256, 512}


@pytest.mark.parametrize("size", sorted(PUBLISHED_CLASSIFIERS))
def test_published_classifier_shapes(size):
    state = _meta_build(adm_classifier, size).state_dict()
    # every published classifier ends at 512 channels on an 8x8 grid (+1 pooled token)
    assert tuple(state["out.2.positional_embedding"].shape) == (512, 65)
    assert tuple(state["out.2.c_proj.weight"].shape) == (1000, 512, 1)


def test_published_classifier_depth():
    keys = _meta_build(adm_classifier, 64).state_dict().keys()
    assert "input_blocks.4.0.in_layers.2.weight" in keys  # depth 4 at 64x64
    # 1 stem + 4 levels * 4 res blocks + 3 downsamples = 20 input blocks: .0 to .19
    assert any(k.startswith("input_blocks.19.") for k in keys)
    assert not any(k.startswith("input_blocks.20.") for k in keys)


def test_unknown_image_size_has_no_published_config():
    with pytest.raises(ValueError, match="96"):
        adm_unet(96)


def test_pt_checkpoint_loads_weights_only(tmp_path):
    model = _randomise(_tiny_unet())
    torch.save(model.state_dict(), tmp_path / "m.pt")
    state = load_state_dict(tmp_path / "m.pt")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class _Payload:
    """Unpickling this would create the sentinel file (a stand-in for arbitrary code)."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (pathlib.Path.touch, (self.sentinel,))


def test_pickled_code_payload_is_refused(tmp_path):
    path, sentinel = tmp_path / "evil.pt", tmp_path / "payload-ran"
    torch.save({"weight": _Payload(sentinel)}, path)  # a real torch checkpoint carrying code
    with pytest.raises(ValueError, match="evil.pt"):
        load_state_dict(path)
    assert not sentinel.exists()


def test_unknown_checkpoint_suffix_and_missing_file(tmp_path):
    (tmp_path / "m.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="'.npz'"):
        load_state_dict(tmp_path / "m.npz")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state_dict(tmp_path / "nope.pt")


def test_strict_loading_rejects_mismatched_keys(tmp_path):
    from safetensors.torch import save_file

    save_file(_tiny_unet().state_dict(), str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit the UNetModel: 1 missing: label_emb.weight"):
        load_checkpoint(_tiny_unet(num_classes=3), tmp_path / "m.safetensors")


def test_published_classifier_runs_in_fp16_as_built():
    """The published classifier with classifier_use_fp16 converts its torso only. It runs at a quarter of its
    width, with 16-channel heads: the same blocks and conversions (one forward at full width took 54 s on a
    2-vCPU CPU without native fp16). Its logits are float32."""
    assert adm_classifier(64).input_blocks[0][0].weight.dtype == torch.float32  # ADM's README flags: fp32
    model = adm_classifier(64, classifier_use_fp16=True).eval()
    assert model.input_blocks[0][0].weight.dtype == torch.float16
    assert model.time_embed[0].weight.dtype == torch.float32  # ADM converts only the torso's convolutions
    narrow = adm_classifier(64, classifier_use_fp16=True, classifier_width=32, num_head_channels=16).eval()
    assert [p.dtype for p in narrow.parameters()] == [p.dtype for p in model.parameters()]
    with torch.no_grad():
        logits = narrow(torch.randn(1, 3, 64, 64), torch.tensor([10]))
    assert logits.shape == (1, 1000) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_fp16_unet_loads_a_float32_checkpoint_and_tracks_the_float32_model(tmp_path):
    from safetensors.torch import save_file

    ref = _randomise(_tiny_unet(out_channels=6))
    save_file(ref.state_dict(), str(tmp_path / "m.safetensors"))
    half = load_checkpoint(_tiny_unet(out_channels=6, use_fp16=True), tmp_path / "m.safetensors").eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(half(x, t), ref(x, t), rtol=2e-2, atol=2e-2)


def test_adm_keys_of_conv_resampling_without_resblock_updown():
    keys = _tiny_unet(resblock_updown=False).state_dict().keys()
    # input_blocks: 0 stem, 1 res, 2 Downsample (conv "op"), 3 res + attention (ds 2)
    assert "input_blocks.2.0.op.weight" in keys and "input_blocks.3.1.qkv.weight" in keys
    # output_blocks.1 at ds 2: res, attention, Upsample (conv "conv")
    assert "output_blocks.1.2.conv.weight" in keys and "output_blocks.1.1.proj_out.weight" in keys
    pooled = _tiny_unet(resblock_updown=False, conv_resample=False).state_dict().keys()
    assert not any(k.endswith((".op.weight", ".conv.weight")) for k in pooled)
    updown = _tiny_unet(resblock_updown=True).state_dict().keys()
    assert "input_blocks.2.0.in_layers.2.weight" in updown and "output_blocks.1.2.in_layers.2.weight" in updown


def test_num_heads_upsample_sets_decoder_heads_only():
    model = _tiny_unet(num_head_channels=-1, num_heads=2, num_heads_upsample=4)
    assert model.input_blocks[3][1].num_heads == 2 and model.middle_block[1].num_heads == 2
    assert model.output_blocks[0][1].num_heads == 4


def test_adaptive_and_spatial_pool_key_sets():
    def head_keys(pool):
        m = EncoderUNetModel(16, 3, 32, 10, 1, (), channel_mult=(1, 2), pool=pool)
        return sorted(k for k in m.state_dict() if k.startswith("out."))

    assert head_keys("adaptive") == ["out.0.bias", "out.0.weight", "out.3.bias", "out.3.weight"]
    assert head_keys("spatial") == ["out.0.bias", "out.0.weight", "out.2.bias", "out.2.weight"]
    assert head_keys("spatial_v2") == [
        "out.0.bias", "out.0.weight", "out.1.bias", "out.1.weight", "out.3.bias", "out.3.weight",
    ]  # fmt: skip
    # spatial heads read the mean of every input block and the middle block: 32 + 32 + 32 + 64 + 64
    m = EncoderUNetModel(16, 3, 32, 10, 1, (), channel_mult=(1, 2), pool="spatial")
    assert m.out[0].weight.shape == (2048, 32 + 32 + 32 + 64 + 64)


def test_a_pickled_module_is_refused_in_one_line_saying_how_to_save_its_weights(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # torch.save(model) instead of model.state_dict()
    with pytest.raises(ValueError) as caught:
        load_state_dict(path)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message and "weights_only=False" not in message
    assert "whole.pt" in message and "torch.nn.modules.linear.Linear" in message
    assert "torch.save(model.state_dict(), path)" in message
    (tmp_path / "junk.pt").write_bytes(b"garbage\x00")
    with pytest.raises(ValueError, match=r"junk.pt': not a readable weights-only checkpoint \(Unsupported operand"):
        load_state_dict(tmp_path / "junk.pt")
