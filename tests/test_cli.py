"""The ``fastguide`` command line end to end, on tiny settings, with the embedded models."""

import json
import math
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastguide.cli import main
from fastguide.generate import generate, load_networks, make_sampler
from fastguide.guidance import EntropyDriven
from fastguide.plots import grid_image

TINY = ["--classes", "0,7", "--count", "2", "--respacing", "ddim4", "--quiet"]


def _files(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_sample_writes_grid_npz_trace_and_gradient_maps(tmp_path):
    out = tmp_path / "out"
    assert main(["sample", "--out", str(out), *TINY, "--grad_maps", "2"]) == 0
    assert _files(out) == ["grad_maps.png", "grid.png", "run.json", "samples_4x32x32x1.npz", "trace.png"]
    with np.load(out / "samples_4x32x32x1.npz", allow_pickle=False) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 32, 32, 1)
        assert data["arr_1"].tolist() == [0, 0, 7, 7]
        images, labels = data["arr_0"], data["arr_1"]
    with Image.open(out / "grid.png") as grid:
        grid.load()
        assert grid.size == (2 * (2 * 34 + 2), 2 * (2 * 34 + 2))  # 2 rows (classes) x 2 columns, 2x upscaled
        assert np.array_equal(np.asarray(grid), grid_image(images, labels)[..., 0])
    for name in ("trace.png", "grad_maps.png"):
        with Image.open(out / name) as im:
            im.load()
            assert im.size[0] > 200 and im.size[1] > 100
    run = json.loads((out / "run.json").read_text())
    assert run["samples"] == 4 and run["files"]["samples"] == "samples_4x32x32x1.npz"


@pytest.mark.parametrize("model, gamma", [("cond", 1.0), ("uncond", 3.0)])
def test_sample_default_gamma_is_the_grids_best_for_the_kind_of_unet(model, gamma):
    """EDS γ when --scale is not given: 1 for a class-conditional UNet, 3 for an unconditional one (docs/results);
    a given --scale is used as it is."""
    from fastguide.cli import build_parser
    from fastguide.cli.sample import _sample_plan

    plan = _sample_plan(build_parser().parse_args(["sample", "--model", model]))
    assert plan["policy"] == EntropyDriven(gamma=gamma)
    plan = _sample_plan(build_parser().parse_args(["sample", "--model", model, "--scale", "2"]))
    assert plan["policy"] == EntropyDriven(gamma=2.0)


def test_sample_is_the_library_sampler_with_the_same_seeds(tmp_path):
    out = tmp_path / "o"
    assert main(["sample", "--out", str(out), *TINY, "--seed", "5", "--batch_size", "3", "--scale", "1.5"]) == 0
    with np.load(out / "samples_4x32x32x1.npz") as data:
        cli_images = data["arr_0"]
    nets = load_networks("cond", "ect", torch.device("cpu"))
    sampler = make_sampler(nets, EntropyDriven(gamma=1.5), "ddim", "ddim4")
    gen = generate(sampler, [0, 0, 7, 7], [5, 6, 7, 8], batch_size=4, device=torch.device("cpu"), progress=False)
    assert np.array_equal(gen.images, cli_images)  # batch size does not change any sample


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "3,12"], "unknown class 12"),
        (["--classes", "x"], "--classes must be comma-separated integers"),
        (["--count", "-1"], "--count must be a positive number"),
        (["--count", "0"], "--count must be a positive number"),
        (["--seeds", "1,2"], "--seeds gives 2 seeds for 4 samples"),
        (["--respacing", "ddim7000"], "7000"),
        (["--eta", "2"], "eta must be in [0, 1]"),
        (["--scale", "nan"], "gamma"),
        (["--scale", "-1"], "gamma must be >= 0 (a negative scale guides away from the target class), got -1.0"),
        (["--policy", "constant", "--scale", "-2"], "scale must be >= 0"),
        (["--model", "nowhere"], "'nowhere' is neither"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
        (["--threshold", "1"], "threshold applies to the gradient-norm policy only"),
        (["--guidance_every", "0"], "guidance_every must be an integer >= 1, got 0"),
        (["--guidance_interval", "700"], "--guidance_interval must be LO,HI (two original timesteps), got '700'"),
        (["--guidance_interval", "a,b"], "--guidance_interval must be LO,HI"),
        (["--guidance_interval", "900,100"], "guidance_interval must be two original timesteps (lo, hi) with 0 <= lo"),
        (["--guidance_interval", "980,990"], "guidance_interval (980, 990) contains none of the chain's timesteps"),
        (["--method", "unipc", "--dynamic_threshold", "2"], "dynamic_threshold must be a quantile in (0, 1], got 2.0"),
        (["--dynamic_threshold", "0.99"], "dynamic_threshold applies to ('dpmpp2m', 'unipc', 'dpmpp3m'), not method 'ddim'"),
    ],
)
def test_bad_sample_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    base = ["sample", "--out", str(out), *TINY]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastguide sample: error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and _files(tmp_path) == []


@pytest.mark.parametrize("method", ["dpmpp2m", "unipc"])
def test_sample_with_a_multistep_solver_and_guidance_every_k_is_the_library_sampler(tmp_path, method):
    out = tmp_path / "o"
    assert main(["sample", "--out", str(out), *TINY, "--method", method, "--respacing", "6", "--guidance_every", "2",
                 "--guidance_interval", "200,999", "--dynamic_threshold", "0.99"]) == 0  # fmt: skip
    text = (out / "run.json").read_text()
    run = json.loads(text, parse_constant=lambda name: pytest.fail(f"run.json holds {name}: not JSON"))
    assert f"{method} 6 steps" in run["what"] and all(math.isfinite(v) for v in run["mean_entropy_first_last"])
    with np.load(out / "samples_4x32x32x1.npz") as data:
        cli_images = data["arr_0"]
    nets = load_networks("cond", "ect", torch.device("cpu"))  # the default γ of a class-conditional UNet: 1
    sampler = make_sampler(nets, EntropyDriven(gamma=1.0), method, "6", guidance_every=2, guidance_interval=(200, 999),
                           dynamic_threshold=0.99)  # fmt: skip
    assert sampler.guidance_plan() == ["call", "reuse", "call", "reuse", "call", "off"]
    gen = generate(sampler, [0, 0, 7, 7], [0, 1, 2, 3], batch_size=4, device=torch.device("cpu"), progress=False)
    assert np.array_equal(gen.images, cli_images)


def test_unwritable_output_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["sample", "--out", str(blocker / "sub"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "fastguide sample: error: output folder" in err and err.count("\n") == 1
    assert _files(tmp_path) == ["file"]
    if os.geteuid() != 0:  # root writes into read-only folders; the file-as-parent case above covers root
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert main(["sample", "--out", str(ro / "x"), *TINY]) == 2
        assert "not writable" in capsys.readouterr().err and _files(ro) == []


@pytest.mark.parametrize("args", [["--policy", "bogus"], ["--count", "abc"], ["--method", "euler"], ["--nope"]])
def test_argparse_errors_are_one_line_too(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("fastguide") and ": error: " in err and err.count("\n") == 1
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policy", "none", "--grad_maps", "2"], "--grad_maps 2 has no effect with --policy none"),
        (["--policy", "none", "--scale", "3"], "--scale 3.0 has no effect"),
        # the library's message: the CLI does not check again what SamplerConfig checks
        (["--method", "ddpm", "--eta", "0.5"], "eta=0.5 applies to method 'ddim' only, not 'ddpm'"),
        (["--method", "unipc", "--eta", "0.5"], "eta=0.5 applies to method 'ddim' only, not 'unipc'"),
        (["--policy", "none", "--guidance_every", "2"], "--guidance_every 2 has no effect with --policy none"),
        (["--grad_maps", "17"], "--grad_maps must be between 0 and 16"),
        (["--model", "ect"], "--model 'ect' is neither"),
    ],
)
def test_options_that_would_be_ignored_are_errors(tmp_path, capsys, args, message):
    assert main(["sample", "--out", str(tmp_path / "o"), *TINY, *args]) == 2
    assert message in capsys.readouterr().err and _files(tmp_path) == []


def test_run_folders_of_the_wrong_kind_are_named(tmp_path, capsys):
    from fastguide.pretrained import embedded_dir

    clf, unet = str(embedded_dir("classifier_ce")), str(embedded_dir("cadm"))
    assert main(["sample", "--out", str(tmp_path / "o"), *TINY, "--model", clf]) == 2
    assert "is a classifier run, not a diffusion UNet" in capsys.readouterr().err
    assert main(["sample", "--out", str(tmp_path / "o"), *TINY, "--classifier", unet]) == 2
    assert "is a diffusion run, not a classifier" in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_a_failure_after_sampling_leaves_no_files(tmp_path, capsys, monkeypatch):
    import fastguide.plots

    def broken(*args, **kwargs):
        raise PermissionError("disk full while drawing")

    monkeypatch.setattr(fastguide.plots, "save_trace_plot", broken)
    out = tmp_path / "out"
    assert main(["sample", "--out", str(out), *TINY]) == 2
    assert "disk full while drawing" in capsys.readouterr().err
    assert _files(tmp_path) == []  # neither the npz nor the grid written before the failure
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["sample", "--out", str(out), *TINY]) == 2
    assert _files(tmp_path) == ["keep.txt", "out"] and _files(out) == ["keep.txt"]


def test_gradient_maps_with_ddpm_over_several_batches(tmp_path):
    out = tmp_path / "o"
    args = ["sample", "--out", str(out), "--classes", "1,2,3", "--count", "1", "--method", "ddpm", "--respacing", "4",
            "--batch_size", "2", "--grad_maps", "3", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "grad_maps.png" in _files(out)


def test_unguided_sampling_writes_no_trace(tmp_path):
    out = tmp_path / "o"
    assert main(["sample", "--out", str(out), *TINY, "--policy", "none", "--model", "uncond"]) == 0
    assert _files(out) == ["grid.png", "run.json", "samples_4x32x32x1.npz"]


def test_evaluate_scores_a_written_npz_and_writes_json(tmp_path, capsys):
    from fastguide.train.data import mnist5k

    train = mnist5k("train")
    pick = np.concatenate([np.flatnonzero(train.labels.numpy() == c)[:20] for c in range(10)])
    images = train.pixels[pick].permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "real.npz", images, train.labels[pick].numpy())
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "real.npz"), "--json", str(tmp_path / "s.json")]) == 0
    lines = capsys.readouterr().out.splitlines()  # ADM's order: "Computing evaluations..." before the scores
    assert lines[0] == "Computing evaluations..." and lines[1].startswith("Inception Score: ")
    assert lines[5].startswith("Recall: ") and lines[6] == "" and lines[7].startswith("fid ")
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["class_accuracy"] >= 0.98 and scores["num_samples"] == 200 and scores["num_reference"] == 500
    assert scores["inception_score"] > 8  # confident and balanced over the 10 digits
    blank = np.zeros_like(images)
    np.savez(tmp_path / "blank.npz", blank, train.labels[pick].numpy())
    assert main(["evaluate", str(tmp_path / "blank.npz"), "--json", str(tmp_path / "b.json")]) == 0
    bad = json.loads((tmp_path / "b.json").read_text())
    assert bad["fid"] > 10 * scores["fid"] and bad["class_accuracy"] <= 0.2
    # all 200 blank images are one point, which falls inside some held-out digit's 3-NN ball in the ResNet's
    # space (precision 1.0 there, 0.0 in the earlier network's): precision alone does not catch a collapse
    assert bad["recall"] == 0.0 and bad["mean_intensity"] == 0.0 and scores["mean_intensity"] > 0.05


def _valid_npz(path):
    np.savez(path, np.zeros((20, 32, 32, 1), np.uint8), np.arange(20) % 10)
    return path


def _cut(path, fraction):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])


def _garble(path):
    data = bytearray(path.read_bytes())
    data[300:340] = b"x" * 40  # inside arr_0's bytes; the zip directory at the end is intact
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("junk"), "is not an .npz file (not a zip archive, or cut short)"),
        (lambda p: p.mkdir(), "s.npz' is a folder, not a file"),
        (lambda p: _cut(_valid_npz(p), 0.5), "is not an .npz file (not a zip archive, or cut short)"),
        (lambda p: _garble(_valid_npz(p)), "is not readable: Bad CRC-32 for file 'arr_0.npy'"),
        (lambda p: np.savez(p, np.zeros((5, 32, 32, 1), np.float32)), "must be uint8"),
        (lambda p: np.savez(p, np.zeros((5, 28, 28, 1), np.uint8)), "28x28"),
        (lambda p: np.savez(p, np.zeros((3, 32, 32, 1), np.uint8)), "need more than 3 samples"),
        (lambda p: np.savez(p, np.zeros((5, 32, 32, 1), np.uint8), np.arange(4)), "arr_1 must be (N,)"),
        (lambda p: np.savez(p, np.zeros((5, 32, 32, 1), np.uint8), np.arange(5) + 8), "label 10 is outside"),
        (lambda p: np.savez(p, x=np.zeros((5, 32, 32, 1), np.uint8)), "has no arr_0"),
    ],
)
def test_bad_evaluate_input_is_one_line(tmp_path, capsys, make, message):
    path = tmp_path / "s.npz"
    make(path)
    assert main(["evaluate", str(path), "--json", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastguide evaluate: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()


def test_evaluate_with_a_torchscript_inception_file(tmp_path, capsys):
    """The --inception path: any TorchScript module with the StyleGAN2-ADA/EDM detector's signature."""

    class FakeDetector(torch.nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
            assert img.dtype == torch.uint8 and img.shape[1] == 3
            x = img.float().mean(dim=1).flatten(1)[:, ::16]  # (N, 64) "pool features"
            if return_features:
                return x
            return torch.softmax(x[:, :8] / 64, dim=1)

    net = torch.jit.script(FakeDetector())
    net.save(str(tmp_path / "inception.pt"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images, np.arange(40) % 10)
    np.savez(tmp_path / "ref.npz", images)
    args = ["evaluate", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception",
            str(tmp_path / "inception.pt"), "--json", str(tmp_path / "j.json")]  # fmt: skip
    assert main(args) == 0
    scores = json.loads((tmp_path / "j.json").read_text())
    assert scores["feature_space"] == "inception" and scores["fid"] == pytest.approx(0.0, abs=1e-6)
    assert scores["sfid"] is None
    out = capsys.readouterr().out
    assert "sFID: n/a (the TorchScript Inception file gives no intermediate (mixed_6/conv) map)" in out
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0
    (tmp_path / "junk.pt").write_text("no")
    assert main(args[:5] + [str(tmp_path / "junk.pt")]) == 2


def test_inception_scores_rgb_samples_without_mnist_class_accuracy(tmp_path, capsys):
    """Labelled 64x64 RGB samples (ImageNet-like) are scored in Inception space; class accuracy is None."""

    class FakeDetector(torch.nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
            x = img.float().flatten(1)[:, ::193]
            return x if return_features else torch.softmax(x[:, :5] / 64, dim=1)

    torch.jit.script(FakeDetector()).save(str(tmp_path / "inception.pt"))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(30, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images, np.arange(30) * 7)  # ImageNet-style labels, beyond MNIST's 10
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, size=(40, 64, 64, 3), dtype=np.uint8))
    assert main(["evaluate", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception",
                 str(tmp_path / "inception.pt"), "--json", str(tmp_path / "new" / "j.json")]) == 0  # fmt: skip
    scores = json.loads((tmp_path / "new" / "j.json").read_text())
    assert scores["class_accuracy"] is None and scores["feature_space"] == "inception"


def test_python_dash_m_and_console_script_agree(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastguide", "sample", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--grad_maps" in out.stdout and "--policy" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fastguide", "sample", "--count", "-3", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--count" in bad.stderr
    assert _files(tmp_path) == []


def test_a_damaged_reference_npz_is_one_line(tmp_path, capsys):
    ref = _valid_npz(tmp_path / "ref.npz")
    _cut(ref, 0.6)
    assert main(["evaluate", str(_valid_npz(tmp_path / "s.npz")), "--ref", str(ref)]) == 2
    err = capsys.readouterr().err
    why = "is not an .npz file (not a zip archive, or cut short)"
    assert err == f"fastguide evaluate: error: reference file {str(ref)!r} {why}\n"


def test_a_folder_where_a_file_belongs_is_named_as_a_folder(tmp_path, capsys):
    from fastguide.adm import load_checkpoint
    from fastguide.pretrained import embedded_dir, run_flags

    (tmp_path / "inception.pt").mkdir()
    assert main(["evaluate", str(_valid_npz(tmp_path / "s.npz")), "--inception", str(tmp_path / "inception.pt")]) == 2
    err = capsys.readouterr().err
    assert "Inception weights file" in err and "inception.pt' is a folder, not a file" in err
    (tmp_path / "w.safetensors").mkdir()
    with pytest.raises(ValueError, match="w.safetensors' is a folder, not a file"):
        load_checkpoint(run_flags(embedded_dir("cadm")).build(), tmp_path / "w.safetensors")


def _damaged_run(folder, name, how):
    """A copy of the embedded run ``name`` whose model.safetensors is cut short or holds another network's weights."""
    import shutil

    from fastguide.pretrained import embedded_dir

    shutil.copytree(embedded_dir(name), folder)
    weights = folder / "model.safetensors"
    if how == "truncated":
        _cut(weights, 0.5)
    else:
        shutil.copy(embedded_dir("classifier_ce" if name == "cadm" else "uadm") / "model.safetensors", weights)
    return folder


@pytest.mark.parametrize(
    "flag, name, net", [("--model", "cadm", "UNetModel"), ("--classifier", "classifier_ect", "EncoderUNetModel")]
)
@pytest.mark.parametrize("how", ["truncated", "mismatched"])
def test_damaged_run_weights_are_one_line_and_write_nothing(tmp_path, capsys, flag, name, net, how):
    run = _damaged_run(tmp_path / "run", name, how)
    out = tmp_path / "out"
    assert main(["sample", "--out", str(out), *TINY, flag, str(run)]) == 2
    err = capsys.readouterr().err
    weights = repr(str(run / "model.safetensors"))
    expected = {"truncated": f"{weights} is not a readable safetensors file (",
                "mismatched": f"{weights} does not fit the {net}: "}[how]  # fmt: skip
    assert err.startswith(f"fastguide sample: error: {expected}") and err.count("\n") == 1, err
    assert not out.exists()


def test_load_checkpoint_raises_the_value_error_it_documents(tmp_path):
    from fastguide.adm import load_checkpoint
    from fastguide.pretrained import embedded_dir, run_flags

    run = _damaged_run(tmp_path / "run", "classifier_ce", "truncated")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_checkpoint(run_flags(run).build(), run / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not fit the EncoderUNetModel: \d+ missing: .*; \d+ unexpected"):
        load_checkpoint(run_flags(run).build(), embedded_dir("cadm") / "model.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_sample_outputs_get_the_users_umask(tmp_path, umask):
    out = tmp_path / "o"
    old = os.umask(umask)
    try:
        assert main(["sample", "--out", str(out), *TINY, "--grad_maps", "1"]) == 0
        assert main(["evaluate", str(out / "samples_4x32x32x1.npz"), "--json", str(out / "scores.json")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_sampling_again_into_a_folder_replaces_the_earlier_run(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["sample", "--out", str(out), *TINY, "--grad_maps", "1"]) == 0
    (out / "notes.txt").write_text("the user's own file")
    capsys.readouterr()
    assert main(["sample", "--out", str(out), "--classes", "3", "--count", "1", "--respacing", "ddim4", "--quiet",
                 "--policy", "none"]) == 0  # fmt: skip
    assert _files(out) == ["grid.png", "notes.txt", "run.json", "samples_1x32x32x1.npz"]
    run = json.loads((out / "run.json").read_text())
    assert sorted(run["files"].values()) == ["grid.png", "run.json", "samples_1x32x32x1.npz"]
    assert "removed the earlier run's grad_maps.png, samples_4x32x32x1.npz, trace.png" in capsys.readouterr().out


def test_precision_and_compile_options_reach_the_sampler(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTGUIDE_COMPILE_BACKEND", "aot_eager")  # the same trace, no code generation
    out = tmp_path / "o"
    assert main(["sample", "--out", str(out), *TINY, "--compile", "--precision", "bfloat16"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["precision"] == "bfloat16"
    assert run["fast_path"] == {"compile": True, "cuda_graphs": False, "autocast": "torch.bfloat16", "channels_last": False}
    assert main(["sample", "--out", str(tmp_path / "d"), *TINY, "--dtype", "float32", "--no-compile"]) == 0  # alias
    assert json.loads((tmp_path / "d" / "run.json").read_text())["fast_path"]["compile"] is False


def test_bad_precision_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--out", str(tmp_path / "o"), "--precision", "fp8"])
    assert exc.value.code == 2 and "argument --precision/--dtype: invalid choice: 'fp8'" in capsys.readouterr().err


def test_an_empty_respacing_is_every_step_as_in_adm():
    from fastguide.generate import load_networks, make_sampler

    nets = load_networks("cond", "ect")
    from fastguide import Constant

    assert make_sampler(nets, Constant(1.0), "ddim", "").schedule.num_steps == 1000
    assert make_sampler(nets, Constant(1.0), "ddim", None).schedule.num_steps == 25


@pytest.mark.parametrize("signum, status, what", [(2, 130, "Ctrl-C \\(SIGINT\\)"), (15, 143, "SIGTERM")],
                         ids=["SIGINT", "SIGTERM"])  # fmt: skip
def test_an_interrupted_sample_ends_in_one_line_and_leaves_nothing(tmp_path, signum, status, what):
    """Ctrl-C or SIGTERM while sampling: one line (no traceback), exit 130/143, no output and no litter."""
    import time

    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "fastguide", "sample", "--count", "200", "--out",
                                 str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
        deadline = time.monotonic() + 120
        while "sampling:" not in err.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == status
    text = err.read_text()
    assert "Traceback" not in text
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert re.fullmatch(rf"fastguide sample: interrupted: stopped by {what}", last), last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt"]


def test_an_os_error_at_run_time_is_one_line_with_status_1(tmp_path, monkeypatch, capsys):
    """A full disk (or any OS error that is not the input's) while writing: one line naming it, status 1."""
    import errno

    import fastguide.files as files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))

    monkeypatch.setattr(files.os, "replace", full)
    assert main(["sample", "--count", "1", "--out", str(tmp_path / "out"), "--respacing", "ddim2", "--quiet"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"fastguide sample: error: No space left on device \(.*\)", line), line
    assert not (tmp_path / "out").exists()


def test_sample_streams_images_and_traces_to_disk_and_equals_the_in_memory_run(tmp_path):
    """A long run holds one batch in memory: generate(store=) writes each batch into memory-mapped files;
    the arrays are the in-memory run's, bit for bit."""
    nets = load_networks("cond", "ect", torch.device("cpu"))
    sampler = make_sampler(nets, EntropyDriven(1.0), "ddim", "ddim4")
    labels, seeds = [0, 7, 3, 3, 1], [5, 6, 7, 8, 9]
    memory = generate(sampler, labels, seeds, 2, torch.device("cpu"), progress=False)
    disk = generate(sampler, labels, seeds, 2, torch.device("cpu"), progress=False, store=tmp_path)
    assert isinstance(disk.images, np.memmap) and isinstance(disk.entropy, np.memmap)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entropy.npy", ".grad_norm.npy", ".images.npy", ".scale.npy"]
    for name in ("images", "entropy", "scale", "grad_norm", "labels", "t"):
        assert np.array_equal(getattr(memory, name), getattr(disk, name), equal_nan=name != "images"), name


def test_the_grid_shows_the_first_columns_of_each_class_at_most():
    images = np.arange(10 * 4 * 4, dtype=np.uint8).reshape(10, 4, 4, 1)
    labels = np.asarray([0] * 7 + [1] * 3)
    grid = grid_image(images, labels, scale=1, pad=1, columns=5)
    assert grid.shape == (2 * 5 + 1, 5 * 5 + 1, 1)
    assert np.array_equal(grid[1:5, 1 + 4 * 5 : 5 + 4 * 5], images[4])  # class 0's fifth sample, no sixth
    assert np.array_equal(grid[6:10, 1 + 2 * 5 : 5 + 2 * 5], images[9])


def test_an_npz_written_in_chunks_is_the_one_np_savez_writes(tmp_path):
    from fastguide.generate import save_npz, save_npz_chunks

    images = np.random.default_rng(0).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(7, dtype=np.int64)
    save_npz_chunks(tmp_path / "c.npz", images.shape, iter([images[:3], images[3:5], images[5:]]), labels)
    save_npz(tmp_path / "s.npz", images, labels)
    with np.load(tmp_path / "c.npz") as c, np.load(tmp_path / "s.npz") as s:
        assert sorted(c.files) == sorted(s.files) == ["arr_0", "arr_1"]
        for name in c.files:
            assert c[name].dtype == s[name].dtype and np.array_equal(c[name], s[name])
    with pytest.raises(ValueError, match="the chunks hold 3 rows, not 7"):
        save_npz_chunks(tmp_path / "d.npz", images.shape, iter([images[:3]]), labels)
    assert not (tmp_path / "d.npz").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "s.npz"]
