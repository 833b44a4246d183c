"""Rebuilding networks from training-run folders."""

import dataclasses
import json

import pytest
import torch

from fastguide.pretrained import load_run
from fastguide.train.data import mnist5k
from fastguide.train.tasks import DEFAULT_UNET, ClassifierTrainConfig, DiffusionTrainConfig, train_classifier, train_diffusion
from test_train import TINY_CLF, _Sized


@pytest.fixture(scope="module")
def tiny_train():
    return _Sized(torch.utils.data.Subset(mnist5k("train"), range(32)))


def test_classifier_run_reloads_to_the_trained_model(tmp_path, tiny_train):
    cfg = ClassifierTrainConfig(out_dir=str(tmp_path / "c"), model=TINY_CLF, batch_size=8, iterations=2,
                                eval_interval=0, progress=False, val_data="none")  # fmt: skip
    result = train_classifier(cfg, train_set=tiny_train)
    loaded = load_run(tmp_path / "c")
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([0, 500])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), result.model.eval()(x, t))


def test_diffusion_run_reloads_ema_by_default(tmp_path, tiny_train):
    flags = dataclasses.replace(DEFAULT_UNET, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                attention_resolutions="16")  # fmt: skip
    cfg = DiffusionTrainConfig(out_dir=str(tmp_path / "d"), model=flags, batch_size=8, iterations=2,
                               eval_interval=0, progress=False, val_data="none", ema_rate=0.5)  # fmt: skip
    result = train_diffusion(cfg, train_set=tiny_train)
    ema = load_run(tmp_path / "d")
    plain = load_run(tmp_path / "d", weights="model")
    assert all(torch.equal(ema.state_dict()[k], result.ema[k]) for k in result.ema)
    assert not torch.equal(ema.state_dict()["out.2.weight"], plain.state_dict()["out.2.weight"])


def test_bad_run_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"lr": 1}))
    with pytest.raises(ValueError, match="no 'model' flags"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="'best'"):
        load_run(tmp_path, weights="best")


def test_ship_model_script_writes_weights_config_and_card(tmp_path, tiny_train):
    import subprocess
    import sys
    from pathlib import Path

    cfg = ClassifierTrainConfig(out_dir=str(tmp_path / "c"), model=TINY_CLF, batch_size=8, iterations=2,
                                eval_interval=0, progress=False, val_data="none", log_interval=1)  # fmt: skip
    train_classifier(cfg, train_set=tiny_train)
    script = Path(__file__).parent.parent / "scripts" / "ship_model.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "c"), "tiny", "--command", "fastguide train-x",
                    "--weights-dir", str(tmp_path / "w")], check=True, capture_output=True)  # fmt: skip
    shipped = tmp_path / "w" / "tiny"
    assert sorted(p.name for p in shipped.iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors"]
    card = (shipped / "MODEL_CARD.md").read_text()
    assert "fastguide train-x" in card and "steps: 2" in card
    assert torch.equal(load_run(shipped).state_dict()["out.2.c_proj.weight"],
                       load_run(tmp_path / "c").state_dict()["out.2.c_proj.weight"])  # fmt: skip


def test_shipped_evaluation_network_reaches_98_percent_on_the_held_out_split():
    from pathlib import Path

    import fastguide

    net = load_run(Path(fastguide.__file__).parent / "weights" / "eval")
    held_out = mnist5k("heldout")
    x = torch.stack([held_out[i][0] for i in range(len(held_out))])
    y = torch.tensor([held_out[i][1] for i in range(len(held_out))])
    with torch.no_grad():
        accuracy = (net(x, torch.zeros(len(x), dtype=torch.long)).argmax(-1) == y).float().mean().item()
    assert accuracy >= 0.98
