"""The evaluator in the embedded evaluation network's feature space, on known cases."""

import numpy as np
import pytest

from fastguide.evaluation import Evaluator, EvalNetFeatures, reference_images
from fastguide.train.data import mnist5k


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator()


def test_the_reference_set_scored_against_itself(evaluator):
    ref = reference_images()
    labels = mnist5k("heldout").labels.numpy()
    s = evaluator(ref, labels)
    assert s.fid == pytest.approx(0.0, abs=1e-6)
    assert s.precision == 1.0 and s.recall == 1.0
    assert s.class_accuracy >= 0.98  # the shipped evaluation network's held-out accuracy
    assert s.inception_score > 8.5  # confident, and the 10 classes are balanced (50 each)


def test_features_are_the_pooled_last_feature_map():
    import torch

    feats = EvalNetFeatures()
    images = reference_images()[:7]
    seen = []
    feats.net.out[1].register_forward_hook(lambda m, i, o: seen.append(o.mean(dim=(2, 3)).double().numpy()))
    f, p = feats(images)
    assert f.shape == (7, 64) and p.shape == (7, 10)
    np.testing.assert_allclose(f, seen[0], rtol=1e-6)  # GroupNorm + SiLU of the last feature map, averaged
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        logits = feats.net(x, torch.zeros(7, dtype=torch.long)).double()
    np.testing.assert_allclose(p, torch.softmax(logits, 1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-9)
    f2, _ = feats(images[::-1].copy())
    np.testing.assert_allclose(f2[::-1], f, rtol=1e-5, atol=1e-6)  # per-image, not per-batch


def test_one_class_collapse_is_caught(evaluator):
    ref, labels = reference_images(), mnist5k("heldout").labels.numpy()
    ones = ref[labels == 1]
    s = evaluator(ones, np.ones(len(ones), dtype=np.int64))
    full = evaluator(ref[::2], labels[::2])
    assert s.fid > 100 * full.fid and s.inception_score < 1.5 and full.inception_score > 9


def test_wrong_labels_lower_class_accuracy(evaluator):
    ref, labels = reference_images(), mnist5k("heldout").labels.numpy()
    assert evaluator(ref, (labels + 1) % 10).class_accuracy < 0.05


# ---- ADM's evaluator: precomputed reference statistics, sFID, its summary lines ----


def balanced_train(per_class: int = 30):
    train = mnist5k("train")
    pick = np.concatenate([np.flatnonzero(train.labels.numpy() == c)[:per_class] for c in range(10)])
    return train.pixels[pick].permute(0, 2, 3, 1).numpy(), train.labels[pick].numpy()


@pytest.fixture(scope="module")
def spatial_evaluator():
    return Evaluator(spatial=True)


def test_spatial_features_are_the_first_channels_of_the_half_resolution_map_pooled_to_a_grid():
    import torch

    feats = EvalNetFeatures()
    images = reference_images()[:5]
    seen = []
    feats.net.input_blocks[feats.spatial_block].register_forward_hook(lambda m, i, o: seen.append(o))
    got = feats.spatial(images)
    assert seen[0].shape[-1] == feats.shape[-1] // 2  # 16×16 for 32×32 images
    want = torch.nn.functional.adaptive_avg_pool2d(seen[0][:, :7], 4).flatten(1).double().numpy()
    assert got.shape == (5, 7 * 4 * 4)
    np.testing.assert_array_equal(got, want)


def test_sfid_sees_a_shift_that_fid_hardly_sees(spatial_evaluator):
    images, labels = balanced_train()
    base = spatial_evaluator(images, labels)
    shifted = spatial_evaluator(np.roll(images, 4, axis=2), labels)
    # measured: FID 0.0046 -> 0.017 (3.7×), sFID 2.8 -> 90 (32×)
    assert shifted.sfid / base.sfid > 5 * (shifted.fid / base.fid)


def test_precomputed_reference_statistics_give_the_same_scores(tmp_path, spatial_evaluator):
    from fastguide import metrics
    from fastguide.evaluation import Reference, load_reference

    images, labels = balanced_train()
    ref = reference_images()
    feats = spatial_evaluator.features
    pool, spatial = metrics.feature_stats(feats(ref)[0]), metrics.feature_stats(feats.spatial(ref))
    np.savez(tmp_path / "adm_ref.npz", arr_0=ref, mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    np.savez(tmp_path / "stats_only.npz", mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    want = spatial_evaluator(images, labels)
    with_stats = Evaluator(load_reference(tmp_path / "adm_ref.npz"), spatial=True)(images, labels)
    assert with_stats == want
    only = Evaluator(load_reference(tmp_path / "stats_only.npz"), spatial=True)
    got = only(images, labels)
    assert (got.fid, got.sfid, got.inception_score) == (want.fid, want.sfid, want.inception_score)
    assert got.precision is None and got.recall is None and got.num_reference == 0
    assert only.adm_summary(got)[-2:] == ["Precision: n/a (the reference has no images)",
                                          "Recall: n/a (the reference has no images)"]  # fmt: skip
    wrong = Reference(None, metrics.GaussianStats(np.zeros(2048), np.eye(2048)))
    with pytest.raises(ValueError, match="precomputed mu/sigma have 2048 dimensions, the resnet features 128"):
        Evaluator(wrong)(images, labels)
    np.savez(tmp_path / "half.npz", mu=pool.mu)
    with pytest.raises(ValueError, match="has mu without sigma"):
        load_reference(tmp_path / "half.npz")
    np.savez(tmp_path / "nothing.npz", x=pool.mu)
    with pytest.raises(ValueError, match=r"has neither arr_0 \(images\) nor mu/sigma"):
        load_reference(tmp_path / "nothing.npz")


def test_adm_summary_lines(spatial_evaluator):
    images, labels = balanced_train(10)
    scores = spatial_evaluator(images, labels)
    lines = spatial_evaluator.adm_summary(scores)
    assert [line.split(": ")[0] for line in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert [float(line.split(": ")[1]) for line in lines] == [scores.inception_score, scores.fid, scores.sfid,
                                                              scores.precision, scores.recall]  # fmt: skip


def test_real_floor_script_scores_disjoint_balanced_draws_of_real_digits(tmp_path):
    """scripts/real_floor.py: its draws are disjoint and class-balanced, its table is the evaluator's scores of
    real digits (every one recognised, none with a grey background), and a request it cannot serve is refused."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "scripts" / "real_floor.py"
    spec = importlib.util.spec_from_file_location("real_floor", script)
    real_floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_floor)
    labels = np.repeat(np.arange(10), 7)
    sets = real_floor.draws(labels, 3, 2, seed=1)
    assert len(sets) == 2 and not set(sets[0]) & set(sets[1])
    assert all(np.array_equal(np.bincount(labels[s], minlength=10), np.full(10, 3)) for s in sets)
    with pytest.raises(ValueError, match="need 9 images of each class; class 0 has 7"):
        real_floor.draws(labels, 3, 3, seed=1)

    out = tmp_path / "floor.md"
    subprocess.run([sys.executable, str(script), "--num_samples", "20", "--draws", "2", "--out", str(out)],
                   check=True, capture_output=True, text=True)  # fmt: skip
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in out.read_text().splitlines()[4:]}
    assert float(rows["fid"][0]) > 0
    assert rows["class_accuracy"][0] == "1" and rows["nonblack_background"][0] == "0"
    bad = subprocess.run([sys.executable, str(script), "--num_samples", "15"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--num_samples must be a positive multiple of 10, got 15" in bad.stderr


def _npz_with_header(path, shape: tuple, data: bytes = b"") -> None:
    """An .npz whose arr_0 header claims ``shape`` (uint8) over ``data``."""
    import io
    import zipfile

    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", buf.getvalue() + data)


def test_npz_files_are_checked_before_they_are_read_and_errors_name_file_and_array(tmp_path):
    """A header claiming more than the file holds (1e9 x 32 x 32 would be a MemoryError), object arrays and
    CRC errors are one ValueError naming the file and the array."""
    import numpy as np

    from fastguide.evaluation import load_npz, load_reference

    _npz_with_header(tmp_path / "big.npz", (10**9, 32, 32, 1), bytes(100))
    with pytest.raises(ValueError, match=r"array 'arr_0' of samples file '.*big.npz' is not readable: its header "
                       r"claims uint8 \(1000000000, 32, 32, 1\) \(1,024,000,000,000 bytes\), but the file holds"):  # fmt: skip
        load_npz(tmp_path / "big.npz")
    np.savez(tmp_path / "obj.npz", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"array 'arr_0' of samples file .*obj.npz.* holds Python objects"):
        load_npz(tmp_path / "obj.npz")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3))
    damaged = bytearray((tmp_path / "ref.npz").read_bytes())
    one = damaged.find(np.float64(1.0).tobytes())  # a byte of sigma's data
    damaged[one + 7] ^= 1
    (tmp_path / "crc.npz").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"array 'sigma' of reference file .*crc.npz.* Bad CRC-32"):
        load_reference(tmp_path / "crc.npz")


@pytest.mark.parametrize("sigma, what", [(np.array([[1.0, 0.5], [0.0, 1.0]]), "not symmetric"),
                                         (np.array([[1.0, 2.0], [2.0, 1.0]]), "negative eigenvalue -1")],
                         ids=["asymmetric", "indefinite"])  # fmt: skip
def test_a_reference_sigma_that_is_not_a_covariance_is_named(tmp_path, sigma, what):
    from fastguide.evaluation import load_reference

    np.savez(tmp_path / "ref.npz", mu=np.zeros(2), sigma=sigma)
    with pytest.raises(ValueError, match=rf"reference '.*ref.npz': sigma is not a covariance matrix: .*{what}"):
        load_reference(tmp_path / "ref.npz")
