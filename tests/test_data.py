"""Tests for pdquant_fast.data: format detection, labels, preprocessing, errors, subsets."""

import hashlib
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from pdquant_fast.data import (
    CifarSpriteDataset,
    DataError,
    ImageFileDataset,
    Preprocess,
    foolbox_samples,
    foolbox_samples_dir,
    open_image_source,
    sha256_of_ids,
    stack_dataset,
    take_subset,
)

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
HAS_FOOLBOX = importlib.util.find_spec("foolbox") is not None
needs_foolbox = pytest.mark.skipif(
    not HAS_FOOLBOX, reason="foolbox sample images missing: pip install --no-deps foolbox==3.3.4"
)


@pytest.fixture(scope="session")
def sprites(shared_data):
    return shared_data / "cifar10" / "convnetjs_png"


def _write(path, size=(32, 32), mode="RGB", color=(10, 200, 30), fmt=None):
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_rejects_unknown_name():
    with pytest.raises(ValueError, match="cifar"):
        Preprocess("imagenet")


def test_cifar_preprocess_matches_torchvision_formula():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = Preprocess("cifar")(arr)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    ref = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # PIL input gives the same tensor as the uint8 array.
    torch.testing.assert_close(Preprocess("cifar")(Image.fromarray(arr)), out, rtol=0, atol=0)


def test_cifar_preprocess_rejects_other_sizes():
    with pytest.raises(DataError, match="32x32"):
        Preprocess("cifar")(Image.new("RGB", (64, 48)))


@pytest.mark.parametrize(
    ("size", "resized"),
    [
        ((227, 227), None),  # shorter side in [224, 256]: crop only
        ((256, 300), None),
        ((240, 500), None),
        ((400, 300), (341, 256)),  # landscape: shorter side -> 256
        ((300, 600), (256, 512)),
        ((100, 80), (320, 256)),  # upsampled
        ((257, 257), (256, 256)),
        ((300, 451), (256, 385)),  # long side rounded (384.85 -> 385), not truncated
    ],
)
def test_efficientnet_geometry(size, resized):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pre = Preprocess("efficientnet")
    out = pre(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    ref_img = img.resize(resized, Image.BICUBIC) if resized else img
    w, h = ref_img.size
    left, top = (w - 224) // 2, (h - 224) // 2  # floor, not torchvision's round
    ref = np.asarray(ref_img.crop((left, top, left + 224, top + 224)))
    expected = (torch.from_numpy(ref.copy()).permute(2, 0, 1).float() - 127) / 128
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA"])
def test_non_rgb_images_decode_to_three_channels(tmp_path, mode):
    ext = ".jpg" if mode in ("L", "CMYK") else ".png"
    _write(tmp_path / f"img{ext}", size=(240, 260), mode=mode)
    assert Image.open(tmp_path / f"img{ext}").mode == mode
    raw = open_image_source(tmp_path, None)
    assert raw[0][0].shape == (3, 260, 240) and raw[0][0].dtype == torch.uint8
    assert open_image_source(tmp_path, "efficientnet")[0][0].shape == (3, 224, 224)


# ----------------------------------------------------------------------------- CIFAR sprites


def test_sprite_test_labels(sprites):
    ds = open_image_source(sprites / "cifar10_batch_50.png", "cifar")
    assert isinstance(ds, CifarSpriteDataset)
    assert len(ds) == 1000
    assert ds.labels[:10] == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    img, label = ds[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == 3
    assert ds.ids[0] == "cifar10_batch_50.png#0"


def test_sprite_folder_splits(sprites):
    train = open_image_source(sprites, "cifar", split="train")
    assert len(train) == 4000
    assert train.labels[:10] == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert train.ids[1000] == "cifar10_batch_1.png#0"
    test = open_image_source(sprites, "cifar", split="test")
    assert len(test) == 1000 and test.labels[:3] == [3, 8, 8]
    with pytest.raises(DataError, match="split='train'"):
        open_image_source(sprites, "cifar")


def test_sprite_list_and_split_mismatch(sprites):
    spec = f"{sprites / 'cifar10_batch_0.png'},{sprites / 'cifar10_batch_2.png'}"
    ds = open_image_source(spec, "cifar", split="train")
    assert len(ds) == 2000
    assert ds.ids[1000] == "cifar10_batch_2.png#0"
    batch2 = open_image_source(sprites / "cifar10_batch_2.png", None)
    assert ds.labels[1000:] == batch2.labels
    assert np.array_equal(ds.images[1005], batch2.images[5])
    with pytest.raises(DataError, match="test batch"):
        open_image_source(sprites / "cifar10_batch_50.png", "cifar", split="train")


@needs_foolbox
def test_foolbox_cifar_samples_equal_sprite_test_images(sprites):
    """The foolbox CIFAR-10 PNGs are test images 0-19: pixel-identical to batch 50."""
    fb = foolbox_samples("cifar10", None)
    sprite = open_image_source(sprites / "cifar10_batch_50.png", None)
    assert fb.labels == sprite.labels[:20]
    for i in range(20):
        assert torch.equal(fb[i][0], sprite[i][0])


def test_sprite_without_labels_file(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (3, 1024, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "cifar10_batch_7.png")
    ds = open_image_source(tmp_path / "cifar10_batch_7.png", None)
    assert len(ds) == 3 and ds.labels == [-1, -1, -1]
    assert torch.equal(ds[1][0], torch.from_numpy(arr[1].reshape(32, 32, 3)).permute(2, 0, 1))


def test_sprite_wrong_width(tmp_path):
    Image.new("RGB", (512, 10)).save(tmp_path / "cifar10_batch_0.png")
    with pytest.raises(DataError, match="1024 px wide"):
        open_image_source(tmp_path, "cifar")


# ----------------------------------------------------------------------------- JPEG sets


def test_cifar_jpeg_class_tree(shared_data):
    root = shared_data / "cifar10" / "yoongikim_jpeg_q75"
    ds = open_image_source(root, "cifar")  # only a test/ folder: descended into
    assert isinstance(ds, ImageFileDataset)
    assert len(ds) == 10_000
    assert sorted(CIFAR_CLASSES) == CIFAR_CLASSES  # alphabetical == official order
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    for label, name in enumerate(CIFAR_CLASSES):
        i = ds.labels.index(label)
        assert ds.ids[i] == f"{name}/0000.jpg"
    assert ds.ids[:2] == ["airplane/0000.jpg", "airplane/0001.jpg"]
    img, label = ds[9999]
    assert img.shape == (3, 32, 32) and label == 9
    same = open_image_source(root, "cifar", split="test")
    assert same.ids == ds.ids


def test_verisilicon_list_file(shared_data):
    folder = shared_data / "imagenet" / "verisilicon_val1300"
    ds = open_image_source(folder, "efficientnet")
    assert len(ds) == 1300
    assert ds.ids[0] == "data/ILSVRC2012_val_00000347.JPEG" and ds.labels[0] == 472
    assert open_image_source(folder / "dataset.txt", "efficientnet").ids == ds.ids
    img, label = ds[0]
    assert img.shape == (3, 224, 224) and label == 472
    raw = open_image_source(folder, None)[0][0]
    expected = (raw[:, 1:225, 1:225].float() - 127) / 128  # 227 -> crop offset floor(3/2)
    torch.testing.assert_close(img, expected, rtol=0, atol=0)


def test_flat_folder_with_synsets(shared_data):
    folder = shared_data / "imagenet" / "eliSchwartz_samples_even"
    synsets = shared_data / "imagenet" / "verisilicon_val1300" / "synset_words.txt"
    plain = open_image_source(folder, "efficientnet")
    assert len(plain) == 500 and set(plain.labels) == {-1}
    ds = open_image_source(folder, "efficientnet", synsets=synsets)
    assert ds.labels == list(range(0, 1000, 2))  # one image per even class index
    assert ds.ids[0] == "n01440764_tench.JPEG"


@needs_foolbox
def test_foolbox_imagenet_samples():
    ds = foolbox_samples("imagenet", "efficientnet")
    assert len(ds) == 20
    assert ds.labels[:4] == [243, 559, 438, 990]
    assert ds.ids[0] == "imagenet_00_243.jpg"
    assert ds[0][0].shape == (3, 224, 224)
    with pytest.raises(DataError, match="pip install --no-deps foolbox"):
        foolbox_samples_dir("no_such_dataset")


# ----------------------------------------------------------------------------- flat folders, errors


def test_flat_folder_labels_and_skipping(tmp_path):
    _write(tmp_path / "cifar10_01_8.PNG")
    _write(tmp_path / "cifar10_00_3.png")
    _write(tmp_path / "holiday.jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"junk")
    ds = open_image_source(tmp_path, "cifar")
    assert ds.ids == ["cifar10_00_3.png", "cifar10_01_8.PNG", "holiday.jpeg"]
    assert ds.labels == [3, 8, -1]
    assert not ds.has_labels
    single = open_image_source(tmp_path / "cifar10_01_8.PNG", "cifar")
    assert len(single) == 1 and single.labels == [8]


def test_class_tree_nested_and_sorted(tmp_path):
    for cls in ["b", "a", "c"]:
        (tmp_path / cls / "sub").mkdir(parents=True)
    _write(tmp_path / "b" / "2.jpg")
    _write(tmp_path / "b" / "1.JPG")
    _write(tmp_path / "a" / "sub" / "x.png")
    _write(tmp_path / "c" / "z.jpeg")
    ds = open_image_source(tmp_path, None)
    assert ds.ids == ["a/sub/x.png", "b/1.JPG", "b/2.jpg", "c/z.jpeg"]
    assert ds.labels == [0, 1, 1, 2]


def test_missing_path():
    with pytest.raises(DataError, match="does not exist.*accepted sources"):
        open_image_source("/no/such/folder", "cifar")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="it is empty.*accepted sources"):
        open_image_source(tmp_path, "cifar")


def test_folder_of_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.csv").write_text("x")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match=r"non-image file.*\.csv.*accepted sources"):
        open_image_source(tmp_path, "cifar")


def test_corrupt_jpeg_names_file(tmp_path):
    _write(tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = open_image_source(tmp_path, "cifar")
    assert ds.ids == ["bad.jpg", "good.jpg"]
    assert ds[1][0].shape == (3, 32, 32)
    with pytest.raises(DataError, match="bad.jpg"):
        ds[0]
    with pytest.raises(DataError, match="bad.jpg"):
        ds.verify()


def test_truncated_jpeg_names_file(tmp_path):
    _write(tmp_path / "t.jpg", size=(64, 64))
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.jpg"):
        open_image_source(tmp_path, None)[0]


def test_list_file_errors(tmp_path):
    _write(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("./a.png, 4\n\n./missing.png, 1\n")
    with pytest.raises(DataError, match="line 3.*missing.png"):
        open_image_source(tmp_path / "list.txt", None)
    (tmp_path / "list.txt").write_text("./a.png, cat\n")
    with pytest.raises(DataError, match="integer label"):
        open_image_source(tmp_path / "list.txt", None)
    (tmp_path / "list.txt").write_text("./a.png, 4\n")
    ds = open_image_source(tmp_path / "list.txt", None)
    assert ds.labels == [4] and ds.ids == ["a.png"]


def test_unknown_split(tmp_path):
    with pytest.raises(DataError, match="unknown split"):
        open_image_source(tmp_path, "cifar", split="calib")


# ----------------------------------------------------------------------------- subsets, hashing


def test_take_subset(sprites):
    ds = open_image_source(sprites / "cifar10_batch_50.png", "cifar")
    first = take_subset(ds, 10)
    assert first.ids == ds.ids[:10] and first.labels == ds.labels[:10]
    assert torch.equal(first[3][0], ds[3][0])
    shifted = take_subset(ds, 5, offset=100)
    assert shifted.ids == ds.ids[100:105]
    a = take_subset(ds, 50, seed=7)
    b = take_subset(ds, 50, seed=7)
    assert a.ids == b.ids and a.ids != ds.ids[:50] and len(set(a.ids)) == 50
    assert take_subset(ds, 50, seed=8).ids != a.ids
    assert len(take_subset(ds, 1000)) == 1000
    with pytest.raises(
        DataError, match="--calib-size 2000 is larger than the 1000 images found in"
    ):
        take_subset(ds, 2000)
    with pytest.raises(DataError, match="offset 600 needs 1100"):
        take_subset(ds, 500, offset=600)
    with pytest.raises(DataError, match="positive"):
        take_subset(ds, 0)


def test_sha256_of_ids():
    ids = ["a/1.jpg", "b/2.jpg"]
    assert sha256_of_ids(ids) == hashlib.sha256(b"a/1.jpg\nb/2.jpg").hexdigest()
    assert sha256_of_ids(ids) != sha256_of_ids(ids[::-1])


def test_dataloader_batches(sprites):
    ds = take_subset(open_image_source(sprites / "cifar10_batch_50.png", "cifar"), 64)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=64)))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == ds.labels
    xs, ys = stack_dataset(ds)
    assert torch.equal(xs, x) and ys.dtype == torch.int64 and ys.tolist() == ds.labels


def test_class_tree_with_empty_class_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write(tmp_path / "a" / "1.png")
    with pytest.raises(DataError, match="class folder.*b hold no images"):
        open_image_source(tmp_path, None)


def test_parent_of_data_sets_is_not_a_class_tree(shared_data):
    with pytest.raises(DataError, match="convnetjs_png holds a CIFAR sprite"):
        open_image_source(shared_data / "cifar10", "cifar")
