"""Image sources and preprocessing for calibration and evaluation.

One entry point, :func:`open_image_source`, turns a user-supplied path into a
``torch.utils.data.Dataset`` of ``(image, label)`` pairs:

* ``image``: float32 tensor ``[3, H, W]`` produced by a :class:`Preprocess`
  (``[3, 32, 32]`` for ``"cifar"``, ``[3, 224, 224]`` for ``"efficientnet"``), or, with
  ``preprocess=None``, the decoded uint8 tensor ``[3, H, W]`` before any geometry change;
* ``label``: int class index, ``-1`` when the source carries no label.

Every dataset also exposes ``ids`` (stable, machine-independent strings, one per item, used to
hash the calibration list with :func:`sha256_of_ids`), ``paths`` (absolute locations, for
messages), ``labels`` (list of int) and ``source`` (a one-line description).

Accepted sources (auto-detected, see :func:`open_image_source`): ConvNetJS CIFAR-10 sprite PNGs,
class-folder trees, VeriSilicon-style list files (``dataset.txt``), and flat image folders.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "ACCEPTED_SOURCES",
    "IMAGE_EXTENSIONS",
    "PREPROCESS_NAMES",
    "CifarSpriteDataset",
    "DataError",
    "ImageFileDataset",
    "ImageSource",
    "Preprocess",
    "SubsetSource",
    "foolbox_samples",
    "foolbox_samples_dir",
    "get_preprocess",
    "open_image_source",
    "sha256_of_ids",
    "stack_dataset",
    "take_subset",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
PREPROCESS_NAMES = ("cifar", "efficientnet")

ACCEPTED_SOURCES = (
    "accepted sources: a ConvNetJS CIFAR-10 sprite file cifar10_batch_K.png (1024 px wide, one "
    "32x32 image per row; labels from cifar10_labels.js beside it), a folder of such sprites "
    "(with split='train' or 'test'), or a comma-separated list of sprite files; a class-folder "
    "tree ROOT/<class>/*.jpg|jpeg|png; a list file such as dataset.txt with lines "
    "'./data/NAME.JPEG, LABEL' (or the folder holding it); a flat folder of images (labels from "
    "'<dataset>_<idx>_<label>.<ext>' names, else -1). Image extensions: "
    + ", ".join(sorted(IMAGE_EXTENSIONS))
)

_CIFAR_MEAN = (0.485, 0.456, 0.406)
_CIFAR_STD = (0.229, 0.224, 0.225)
_SPRITE_NAME = re.compile(r"^cifar10_batch_(\d+)\.png$", re.IGNORECASE)
_FOOLBOX_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9]*)_(\d+)_(\d+)$")
_WNID_NAME = re.compile(r"^(n\d{8})(?:_|$)")
_SPLIT_DIRS = ("train", "val", "test")
CIFAR_TEST_BATCH = 50


class DataError(ValueError):
    """A data source is missing, empty, in an unsupported format, or holds an unreadable image."""


# ----------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """Per-model-family image preprocessing: PIL image or uint8 array -> float32 ``[3, H, W]``.

    ``name``:

    * ``"cifar"``: no resize or crop (the image must be 32x32); ``x = uint8 / 255`` then
      ``(x - mean) / std`` with ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225),
      in float32 in that order (as torchvision ``ToTensor`` + ``Normalize``).
    * ``"efficientnet"``: if the shorter side is in [224, 256], center-crop 224x224 (e.g. the
      227x227 VeriSilicon images); otherwise resize the shorter side to 256 (PIL bicubic; longer
      side ``round(256 * long / short)``) and center-crop 224x224 at offset
      ``(size - 224) // 2``. Then ``x = (uint8 - 127) / 128``. These two roundings reproduce
      the data README's Lite0 figures exactly (val1300 82.69 %, calibration-500 89.20 %);
      torchvision's (``int`` for the long side, ``round`` for the offset) give 83.38 / 88.40.

    Images are converted with ``.convert("RGB")`` first (grayscale, CMYK, palette all work).
    """

    name: str

    def __post_init__(self) -> None:
        if self.name not in PREPROCESS_NAMES:
            raise ValueError(
                f"unknown preprocessing {self.name!r}: supported are {list(PREPROCESS_NAMES)}"
            )

    @property
    def input_size(self) -> tuple[int, int, int]:
        """Output tensor shape ``(3, H, W)``."""
        return (3, 32, 32) if self.name == "cifar" else (3, 224, 224)

    def geometry(self, image: Image.Image, where: str = "image") -> Image.Image:
        """RGB-convert and resize/crop a PIL image to the model's input size (still uint8)."""
        image = _to_rgb(image)
        w, h = image.size
        if self.name == "cifar":
            if (w, h) != (32, 32):
                raise DataError(
                    f"{where} is {w}x{h} but CIFAR preprocessing takes 32x32 images as they are "
                    "(no resize or crop); is this source meant for an ImageNet model?"
                )
            return image
        crop = 224
        short = min(w, h)
        if not crop <= short <= 256:
            if w <= h:
                size = (256, round(256 * h / w))
            else:
                size = (round(256 * w / h), 256)
            image = image.resize(size, Image.BICUBIC)
            w, h = image.size
        left, top = (w - crop) // 2, (h - crop) // 2
        return image.crop((left, top, left + crop, top + crop))

    def normalize(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` / ``[N, H, W, 3]`` -> float32 ``[3, H, W]`` / ``[N, 3, H, W]``.

        Applies only the value normalisation, no geometry change; the caller guarantees the size.
        """
        t = torch.as_tensor(pixels)
        if t.dtype != torch.uint8 or t.shape[-1] != 3 or t.dim() not in (3, 4):
            raise DataError(
                f"expected uint8 pixels [H, W, 3] or [N, H, W, 3], got {t.dtype} {tuple(t.shape)}"
            )
        t = t.movedim(-1, -3).float()
        if self.name == "cifar":
            view = (3, 1, 1)
            mean = torch.tensor(_CIFAR_MEAN).view(view)
            std = torch.tensor(_CIFAR_STD).view(view)
            return t.div_(255).sub_(mean).div_(std).contiguous()
        return t.sub_(127.0).div_(128.0).contiguous()

    def __call__(self, image: Image.Image | np.ndarray, where: str = "image") -> torch.Tensor:
        """PIL image (any mode) or uint8 ``[H, W, 3]`` array -> float32 ``[3, H, W]``."""
        if isinstance(image, np.ndarray):
            if self.name == "cifar" and image.shape == (32, 32, 3) and image.dtype == np.uint8:
                return self.normalize(image)
            image = Image.fromarray(image)
        return self.normalize(np.array(self.geometry(image, where)))


def get_preprocess(preprocess: Preprocess | str | None) -> Preprocess | None:
    """Coerce a name (``"cifar"``, ``"efficientnet"``), a :class:`Preprocess` or None."""
    if preprocess is None or isinstance(preprocess, Preprocess):
        return preprocess
    if isinstance(preprocess, str):
        return Preprocess(preprocess)
    raise TypeError(
        f"preprocess must be a Preprocess, a name or None, not {type(preprocess).__name__}"
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    with warnings.catch_warnings():
        # Palette images with byte transparency warn on conversion; the result is still right.
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")


def _decode_rgb(path: str) -> Image.Image:
    """Fully decode ``path`` to an RGB PIL image, or raise DataError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = _to_rgb(im)
            # Leaving the block closes ``im``; older Pillow then poisons its pixel data.
            return im.copy() if rgb is im else rgb
    except FileNotFoundError as exc:
        raise DataError(
            f"image file {path} cannot be opened (deleted, or a broken link); every listed "
            "image must be a readable file"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot decode image file {path}: {exc}; files with an image extension "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) must be images Pillow can decode"
        ) from exc


# ----------------------------------------------------------------------------- datasets


class ImageSource(Dataset):
    """Base class: a dataset of ``(image, label)`` with per-item ``ids``/``paths``/``labels``.

    ``image`` is float32 ``[3, H, W]`` (or uint8 ``[3, H, W]`` when ``preprocess`` is None);
    ``label`` is an int, -1 when unknown.
    """

    ids: list[str]
    paths: list[str]
    labels: list[int]
    source: str
    preprocess: Preprocess | None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_labels(self) -> bool:
        """True when every item has a label >= 0."""
        return bool(self.labels) and min(self.labels) >= 0

    def __repr__(self) -> str:
        pre = self.preprocess.name if self.preprocess else None
        return f"{type(self).__name__}({len(self)} images from {self.source}, preprocess={pre!r})"


class CifarSpriteDataset(ImageSource):
    """ConvNetJS CIFAR-10 sprite PNGs decoded once into memory.

    ``images``: uint8 ``[N, 32, 32, 3]`` (NHWC), all sprites concatenated in the given order.
    Item ``i`` is ``preprocess(images[i])``. ``ids`` are ``"cifar10_batch_K.png#r"``.
    """

    def __init__(self, files: Sequence[str | Path], preprocess: Preprocess | None) -> None:
        self.preprocess = preprocess
        self.ids, self.paths, self.labels = [], [], []
        arrays = []
        label_cache: dict[Path, list[int] | None] = {}
        for f in files:
            f = Path(f).resolve()
            m = _SPRITE_NAME.match(f.name)
            if m is None:
                raise DataError(f"{f} is not a ConvNetJS sprite file (cifar10_batch_K.png)")
            batch = int(m.group(1))
            arr = _decode_sprite(f)
            folder = f.parent
            if folder not in label_cache:
                label_cache[folder] = _read_sprite_labels(folder)
            all_labels = label_cache[folder]
            n = arr.shape[0]
            if all_labels is None:
                labels = [-1] * n
            else:
                start = batch * 1000
                if start + n > len(all_labels):
                    raise DataError(
                        f"{folder / 'cifar10_labels.js'} has {len(all_labels)} labels, too few for "
                        f"{f.name} (needs indices {start}..{start + n - 1})"
                    )
                labels = all_labels[start : start + n]
            arrays.append(arr)
            self.labels.extend(labels)
            self.ids.extend(f"{f.name}#{r}" for r in range(n))
            self.paths.extend(f"{f}#{r}" for r in range(n))
        self.images = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        self.source = ", ".join(str(Path(f).resolve()) for f in files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = self.images[index]
        if self.preprocess is None:
            img = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        else:
            img = self.preprocess(pixels, where=self.paths[index])
        return img, self.labels[index]


def _decode_sprite(path: Path) -> np.ndarray:
    img = _decode_rgb(str(path))
    w, h = img.size
    if w != 1024:
        raise DataError(
            f"{path} is {w}x{h}; a ConvNetJS CIFAR sprite is 1024 px wide "
            "(one 32x32x3 image per row)"
        )
    return np.array(img).reshape(h, 32, 32, 3)


def _read_sprite_labels(folder: Path) -> list[int] | None:
    path = folder / "cifar10_labels.js"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    lo, hi = text.find("["), text.rfind("]")
    try:
        labels = json.loads(text[lo : hi + 1]) if 0 <= lo < hi else None
    except json.JSONDecodeError as exc:
        raise DataError(f"cannot parse {path}: expected 'var labels=[...];' ({exc})") from exc
    if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
        raise DataError(f"cannot parse {path}: expected 'var labels=[...];' with integer labels")
    return labels


class ImageFileDataset(ImageSource):
    """Image files decoded lazily in ``__getitem__``.

    ``paths``: absolute file paths; ``ids``: paths relative to ``root`` (POSIX separators);
    ``labels``: ints, -1 when unknown. A file that fails to decode raises :class:`DataError`
    naming it.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        labels: Sequence[int],
        preprocess: Preprocess | None,
        *,
        root: str | Path,
        source: str,
    ) -> None:
        if len(files) != len(labels):
            raise ValueError("files and labels differ in length")
        root = Path(root).resolve()
        self.preprocess = preprocess
        self.paths = [str(Path(f).resolve()) for f in files]
        self.ids = [_relative_id(p, root) for p in self.paths]
        self.labels = [int(v) for v in labels]
        self.root = str(root)
        self.source = source

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        img = _decode_rgb(path)
        if self.preprocess is None:
            out = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
        else:
            out = self.preprocess(img, where=f"image file {path}")
        return out, self.labels[index]

    def verify(self) -> None:
        """Decode every image once; raise :class:`DataError` naming the first bad file."""
        for p in self.paths:
            _decode_rgb(p)


def _relative_id(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


class SubsetSource(ImageSource):
    """Items ``indices`` of another :class:`ImageSource`, keeping ``ids``/``paths``/``labels``."""

    def __init__(self, base: ImageSource, indices: Sequence[int], description: str) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.preprocess = base.preprocess
        self.ids = [base.ids[i] for i in self.indices]
        self.paths = [base.paths[i] for i in self.indices]
        self.labels = [base.labels[i] for i in self.indices]
        self.source = f"{description} of {base.source}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base[self.indices[index]]


# ----------------------------------------------------------------------------- detection


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _listing(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(image files, sub-folders, other files) directly in ``folder``, sorted by name."""
    images, dirs, other = [], [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            dirs.append(entry)
        elif _is_image(entry):
            images.append(entry)
        else:
            other.append(entry)
    return images, dirs, other


def _summary(images: list[Path], dirs: list[Path], other: list[Path]) -> str:
    if not (images or dirs or other):
        return "it is empty"
    parts = []
    if dirs:
        parts.append(
            f"{len(dirs)} sub-folder(s) ({', '.join(d.name for d in dirs[:3])}) without images"
        )
    if other:
        exts = sorted({p.suffix.lower() or "(no extension)" for p in other})
        parts.append(f"{len(other)} non-image file(s) ({', '.join(exts[:5])})")
    return "it holds " + " and ".join(parts)


def _first_names(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def _walk_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files under ``folder``, sorted; folders holding sprites or a dataset.txt)."""
    found, nested = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if "dataset.txt" in filenames or any(_SPRITE_NAME.match(f) for f in filenames):
            nested.append(Path(dirpath))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(Path(dirpath) / f))
    return found, nested


def _read_synsets(synsets: str | Path | Sequence[str] | None) -> dict[str, int] | None:
    if synsets is None:
        return None
    if isinstance(synsets, (str, Path)):
        path = Path(synsets)
        if not path.is_file():
            raise DataError(f"synset list {path} does not exist")
        wnids = [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]
    else:
        wnids = list(synsets)
    return {w: i for i, w in enumerate(wnids)}


def _flat_label(name: str, wnid_index: dict[str, int] | None) -> int:
    stem = Path(name).stem
    m = _FOOLBOX_NAME.match(stem)
    if m:
        return int(m.group(3))
    if wnid_index is not None:
        m = _WNID_NAME.match(stem)
        if m and m.group(1) in wnid_index:
            return wnid_index[m.group(1)]
    return -1


def _flat_dataset(
    files: list[Path], root: Path, preprocess: Preprocess | None, wnid_index, source: str
) -> ImageFileDataset:
    labels = [_flat_label(f.name, wnid_index) for f in files]
    return ImageFileDataset(files, labels, preprocess, root=root, source=source)


def _class_tree(root: Path, preprocess: Preprocess | None) -> ImageFileDataset | None:
    _, dirs, _ = _listing(root)
    files, labels, empty, nested = [], [], [], []
    for label, d in enumerate(dirs):
        found, inner = _walk_images(d)
        files.extend(found)
        labels.extend([label] * len(found))
        nested.extend(inner)
        if not found:
            empty.append(d.name)
    if not files:
        return None
    if nested:
        raise DataError(
            f"{root} is not a class-folder tree: {nested[0]} holds a CIFAR sprite or list-file "
            "data set; pass that folder instead"
        )
    if empty:
        raise DataError(
            f"{root} looks like a class-folder tree but class folder(s) {_first_names(empty)} "
            "hold no images; every class folder needs images (the label is the folder's index "
            "in sorted order)"
        )
    source = f"class-folder tree {root} ({len(dirs)} classes)"
    return ImageFileDataset(files, labels, preprocess, root=root, source=source)


def _list_file(path: Path, preprocess: Preprocess | None) -> ImageFileDataset:
    folder = path.parent
    files, labels = [], []
    for lineno, line in enumerate(
        path.read_text(encoding="utf-8", errors="replace").splitlines(), 1
    ):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "," in line:
            name, _, label_text = line.rpartition(",")
        else:
            name, _, label_text = line.rpartition(" ")
            if not name:
                name, label_text = label_text, "-1"
        name, label_text = name.strip(), label_text.strip()
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(
                f"{path} line {lineno}: expected 'PATH, LABEL' with an integer label, got {line!r}"
            ) from None
        f = (folder / name).resolve()
        if not f.is_file():
            raise DataError(f"{path} line {lineno}: image file {f} does not exist")
        files.append(f)
        labels.append(label)
    if not files:
        raise DataError(
            f"list file {path} names no images; expected lines './data/NAME.JPEG, LABEL'"
        )
    return ImageFileDataset(files, labels, preprocess, root=folder, source=f"list file {path}")


def _sprite_files_in(folder: Path) -> dict[int, Path]:
    found = {}
    for p in folder.iterdir():
        m = _SPRITE_NAME.match(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return found


def _check_split(split: str | None) -> None:
    if split is not None and split not in _SPLIT_DIRS:
        raise DataError(f"unknown split {split!r}: use one of {list(_SPLIT_DIRS)} or None")


def _sprite_batches_for_split(folder: Path, split: str | None) -> list[Path]:
    batches = _sprite_files_in(folder)
    train = [batches[k] for k in sorted(batches) if k < CIFAR_TEST_BATCH]
    test = [batches[k] for k in sorted(batches) if k >= CIFAR_TEST_BATCH]
    present = ", ".join(batches[k].name for k in sorted(batches))
    if split == "train":
        chosen = train
    elif split in ("test", "val"):
        chosen = test
    elif train and test:
        raise DataError(
            f"{folder} holds CIFAR-10 train and test sprites ({present}); pass split='train' "
            "(batches 0..49) or split='test' (batch 50), or name the sprite file"
        )
    else:
        chosen = train or test
    if not chosen:
        raise DataError(f"{folder} holds no {split} sprites (found {present})")
    return chosen


def _check_sprite_split(files: list[Path], split: str | None) -> None:
    if split is None:
        return
    for f in files:
        is_test = int(_SPRITE_NAME.match(f.name).group(1)) >= CIFAR_TEST_BATCH
        if is_test != (split in ("test", "val")):
            raise DataError(
                f"split={split!r} but {f.name} is a CIFAR-10 {'test' if is_test else 'train'} batch"
            )


def open_image_source(
    path: str | Path,
    preprocess: Preprocess | str | None,
    *,
    split: str | None = None,
    synsets: str | Path | Sequence[str] | None = None,
) -> ImageSource:
    """Open an image source, auto-detecting its format; return an :class:`ImageSource`.

    Items are ``(image, label)``: ``image`` float32 ``[3, H, W]`` from ``preprocess`` (a
    :class:`Preprocess` or its name; None gives the decoded uint8 ``[3, H, W]``), ``label`` an
    int (-1 when unknown).

    Formats, tried in this order:

    a. ConvNetJS CIFAR-10 sprites: a file ``cifar10_batch_K.png``, a comma-separated list of
       them, or a folder holding them. Image ``r`` of batch ``K`` has label
       ``labels[K * 1000 + r]`` from ``cifar10_labels.js`` in the same folder (-1 if absent).
       For a folder, ``split="train"`` takes batches 0..49 present, ``split="test"`` batch 50;
       with ``split=None`` the folder must hold only one kind. Decoded once, kept in memory.
    b. A list file (any ``*.txt``, e.g. VeriSilicon ``dataset.txt``) with lines
       ``PATH, LABEL`` relative to the file's folder, or a folder holding ``dataset.txt``.
    c. A flat folder of images (or a single image file): sorted by file name; labels from
       foolbox-style names ``<dataset>_<idx>_<label>.<ext>``, or, given ``synsets`` (a
       ``synset_words.txt`` path or a list of WordNet IDs), from ``<wnid>_*`` names; else -1.
    d. A class-folder tree ``ROOT/<class>/**/*.jpg|png|...``: label = index of the class
       folder in sorted order, items sorted by (class, path). With ``split`` and a
       ``ROOT/<split>/`` folder, that folder is the root; with ``split=None`` and exactly one
       of ``train/val/test`` present (and nothing else), that one is used.

    ``split`` (``"train"``, ``"val"``, ``"test"`` or None) only selects within sources that
    have splits (sprite folders, roots holding ``train/``, ``val/``, ``test/``); a sprite file
    of the other split is an error; other sources ignore it.

    Files with non-image extensions are skipped; image files are decoded lazily and a file
    that fails to decode raises :class:`DataError` naming it.

    Raises :class:`DataError` (a ValueError) for a missing path, an empty folder, a folder
    without images, or an unreadable list/labels file, saying what was found and what is
    accepted.
    """
    _check_split(split)
    pre = get_preprocess(preprocess)
    wnid_index = _read_synsets(synsets)
    text = str(path)
    if "," in text and not Path(text).exists():
        files = [Path(p.strip()) for p in text.split(",") if p.strip()]
        for f in files:
            if not f.is_file():
                raise DataError(f"{f} (in the comma-separated list {text!r}) does not exist")
            if not _SPRITE_NAME.match(f.name):
                raise DataError(
                    f"a comma-separated list must name CIFAR sprite files cifar10_batch_K.png; "
                    f"{f} is not one. {ACCEPTED_SOURCES}"
                )
        _check_sprite_split(files, split)
        return CifarSpriteDataset(files, pre)

    p = Path(text).expanduser()
    if not p.exists():
        raise DataError(f"data path {p} does not exist. {ACCEPTED_SOURCES}")
    if p.is_file():
        if _SPRITE_NAME.match(p.name):
            _check_sprite_split([p], split)
            return CifarSpriteDataset([p], pre)
        if p.suffix.lower() == ".txt":
            return _list_file(p, pre)
        if _is_image(p):
            return _flat_dataset([p], p.parent, pre, wnid_index, f"image file {p}")
        raise DataError(f"{p} is neither an image, a sprite nor a list file. {ACCEPTED_SOURCES}")

    root = p.resolve()
    if _sprite_files_in(root):
        return CifarSpriteDataset(_sprite_batches_for_split(root, split), pre)
    if (root / "dataset.txt").is_file():
        return _list_file(root / "dataset.txt", pre)
    images, dirs, other = _listing(root)
    if images:
        return _flat_dataset(images, root, pre, wnid_index, f"image folder {root}")
    split_dirs = [d for d in dirs if d.name in _SPLIT_DIRS]
    if split is not None and (root / split).is_dir():
        return open_image_source(root / split, pre, synsets=synsets)
    if split is None and len(split_dirs) == 1 and len(dirs) == 1:
        return open_image_source(split_dirs[0], pre, synsets=synsets)
    if split_dirs and split is None:
        raise DataError(
            f"{root} holds split folders {[d.name for d in split_dirs]}; pass split=... to pick one"
        )
    tree = _class_tree(root, pre)
    if tree is not None:
        return tree
    raise DataError(
        f"no images found in {root}: {_summary(images, dirs, other)}. {ACCEPTED_SOURCES}"
    )


# ----------------------------------------------------------------------------- foolbox samples


def foolbox_samples_dir(dataset: str = "imagenet") -> str:
    """Path of the ``data/`` folder of the installed ``foolbox`` wheel (3.3.4: 20 images each of
    imagenet, cifar10, cifar100, mnist, fashionMNIST, named ``<dataset>_<idx>_<label>.<ext>``).

    ``foolbox`` is located with ``importlib.util.find_spec`` and never imported. Raises
    :class:`DataError` with an install hint if it is missing or has no ``dataset`` samples.
    """
    hint = "install the sample images with: pip install --no-deps foolbox==3.3.4"
    try:
        spec = importlib.util.find_spec("foolbox")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise DataError(f"the foolbox package is not installed; {hint}")
    folder = Path(spec.origin).parent / "data"
    if not folder.is_dir() or not any(folder.glob(f"{dataset}_*")):
        raise DataError(f"no {dataset}_* sample images in {folder}; {hint}")
    return str(folder)


def foolbox_samples(
    dataset: str = "imagenet", preprocess: Preprocess | str | None = None
) -> ImageFileDataset:
    """Dataset of the foolbox wheel's ``<dataset>_<idx>_<label>.*`` images, in index order.

    ImageNet labels are sorted-WordNet-ID indices (0..999); CIFAR-10 samples are test images
    0..19. Items are ``(float32 [3, H, W], int label)`` as for :func:`open_image_source`.
    """
    folder = Path(foolbox_samples_dir(dataset))
    pattern = re.compile(rf"^{re.escape(dataset)}_(\d+)_(\d+)$")
    files = sorted(
        (f for f in folder.iterdir() if _is_image(f) and pattern.match(f.stem)),
        key=lambda f: int(pattern.match(f.stem).group(1)),
    )
    labels = [int(pattern.match(f.stem).group(2)) for f in files]
    return ImageFileDataset(
        files,
        labels,
        get_preprocess(preprocess),
        root=folder,
        source=f"foolbox {dataset} samples in {folder}",
    )


# ----------------------------------------------------------------------------- subsets, hashing


def take_subset(
    dataset: ImageSource,
    n: int,
    *,
    seed: int | None = None,
    offset: int = 0,
    option: str = "--calib-size",
) -> SubsetSource:
    """Deterministic subset of ``n`` items: ``dataset[offset : offset + n]``, or, with ``seed``,
    the same slice of a ``torch.randperm(len(dataset))`` drawn from ``torch.Generator(seed)``.

    ``ids``/``paths``/``labels`` follow the chosen items. Raises :class:`DataError` when
    ``offset + n`` exceeds the dataset, e.g. "--calib-size 2000 is larger than the 1000 images
    found in ..." (``option`` names the setting in the message).
    """
    total = len(dataset)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"{option} must be a positive integer, got {n!r}")
    if offset < 0:
        raise DataError(f"subset offset must be >= 0, got {offset}")
    if offset + n > total:
        if offset:
            raise DataError(
                f"{option} {n} with offset {offset} needs {offset + n} images but only {total} "
                f"were found in {dataset.source}"
            )
        raise DataError(f"{option} {n} is larger than the {total} images found in {dataset.source}")
    if seed is None:
        indices = list(range(offset, offset + n))
        what = f"items {offset}..{offset + n - 1}"
    else:
        gen = torch.Generator().manual_seed(int(seed))
        indices = torch.randperm(total, generator=gen, device="cpu")[offset : offset + n].tolist()
        what = f"{n} items drawn with seed {seed}"
    return SubsetSource(dataset, indices, what)


def stack_dataset(dataset: Dataset, *, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Load every item: images stacked to ``[N, 3, H, W]`` (float32 after preprocessing, uint8
    without) and labels to int64 ``[N]`` (-1 where unknown). Holds all of it in memory."""
    if len(dataset) == 0:
        raise DataError("the data set is empty")
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=num_workers)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


def sha256_of_ids(ids: Iterable[str]) -> str:
    """Hex SHA-256 of the identifiers joined by ``"\\n"`` (UTF-8), e.g. of ``dataset.ids``."""
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()
