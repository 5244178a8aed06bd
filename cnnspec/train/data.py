"""Datasets for training: loaders, resizing to a spec's input, splitting and mini-batching.

Every loader returns a :class:`Dataset` whose images are float32 (N, C, H, W) in [0, 1] and
whose labels are int64. Anything wrong with a user's file raises :class:`DataError` with one
message naming the file, what is wrong and how to fix it, so the CLI never shows a traceback
for bad input.
"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..layers.upsample import bilinear_taps  # the one half-pixel resampling rule

# The built-in set: UCI optical recognition of handwritten digits (E. Alpaydin, C. Kaynak,
# 1998), CC BY 4.0, the copy scikit-learn ships. See cnnspec/data/README.md for provenance.
DIGITS_PATH = Path(__file__).resolve().parent.parent / "data" / "digits.npz"
# Seed and fraction of the fixed held-out part of the digits set (split="test").
DIGITS_TEST_SEED = 0
DIGITS_TEST_FRACTION = 0.2

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32  # one label byte, then the R, G and B 32x32 planes
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch.bin",)
SPLITS = ("train", "test")


class DataError(Exception):
    """Bad or missing input data; the message is meant to be shown to the user as is."""


@dataclass
class Dataset:
    """Images ``x`` float32 (N, C, H, W) in [0, 1], labels ``y`` int64 (N,)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    pixels: str = ""  # how stored values became x, e.g. "uint8 0..255 divided by 255"

    def __post_init__(self) -> None:
        # Programmer errors, not user errors: loaders always produce this layout.
        if self.x.dtype != np.float32 or self.x.ndim != 4:
            raise ValueError(
                f"Dataset.x must be float32 (N, C, H, W), got {self.x.dtype} {self.x.shape}"
            )
        if self.y.dtype != np.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"Dataset.y must be int64 ({self.x.shape[0]},), got {self.y.dtype} {self.y.shape}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(int(d) for d in self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray, name: str | None = None) -> Dataset:
        return Dataset(
            np.ascontiguousarray(self.x[index]),
            np.ascontiguousarray(self.y[index]),
            self.num_classes,
            name or self.name,
            self.pixels,
        )


def _labels_to_dataset(x: np.ndarray, y: np.ndarray, name: str, pixels: str) -> Dataset:
    y = y.astype(np.int64)
    return Dataset(np.ascontiguousarray(x), y, int(y.max()) + 1 if len(y) else 0, name, pixels)


def _stored(a: np.ndarray, divisor) -> str:
    """How stored values became inputs, for the range check of predict and eval."""
    return f"{a.dtype} {a.min()}..{a.max()} divided by {divisor}"


def _u8_to_unit(a: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 0..1 (division, so 255 maps exactly to 1.0)."""
    return np.divide(a, np.float32(255), dtype=np.float32)


# ---------------------------------------------------------------- built-in digits


def load_builtin_digits(split: str = "all") -> Dataset:
    """The built-in UCI handwritten digits: 1797 grey 8x8 images, 10 classes.

    Data: E. Alpaydin and C. Kaynak (1998), "Optical Recognition of Handwritten Digits",
    UCI Machine Learning Repository, https://doi.org/10.24432/C50P49, licence CC BY 4.0.

    The set has no official train/test division, so ``split="train"`` and ``split="test"``
    return a fixed stratified 80/20 division (seed 0), letting ``eval`` measure images that
    training never saw; ``split="all"`` returns all 1797 images. Pixels (0..16) are divided
    by 16.
    """
    if split not in (*SPLITS, "all"):
        raise DataError(f"unknown split {split!r} for the built-in digits; use train, test or all")
    with np.load(DIGITS_PATH, allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    images = np.divide(x, np.float32(16), dtype=np.float32)[:, None, :, :]
    ds = Dataset(
        np.ascontiguousarray(images),
        y.astype(np.int64),
        10,
        "digits",
        "digits: 0..16 divided by 16",
    )
    if split == "all":
        return ds
    train, test = split_dataset(ds, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    train.name, test.name = "digits:train", "digits:test"
    return train if split == "train" else test


# ---------------------------------------------------------------- IDX (MNIST)


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently un-gzipped (detected by the gzip magic, not the name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path}: the gzip data is corrupt or truncated ({e}); download the file again"
            ) from None
    return raw


def _parse_idx(raw: bytes, path: Path, kind: str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes; ``kind`` is "images" (3-D) or "labels" (1-D)."""
    want_ndim = 3 if kind == "images" else 1
    other = "labels" if kind == "images" else "images"
    if len(raw) < 4:
        raise DataError(
            f"{path}: only {len(raw)} bytes, too short for an IDX header; the file is truncated"
        )
    if raw[:2] != b"\0\0":
        raise DataError(
            f"{path}: not an IDX file (magic number 0x{raw[:4].hex()}, expected "
            f"0x{IDX_IMAGES_MAGIC if kind == 'images' else IDX_LABELS_MAGIC:08x}); give the "
            f"MNIST-style {kind} file, e.g. train-{kind}-idx{want_ndim}-ubyte.gz"
        )
    if raw[2] != 0x08:
        raise DataError(
            f"{path}: IDX element type 0x{raw[2]:02x} is not supported; only unsigned bytes "
            "(0x08, as in MNIST and Fashion-MNIST) are"
        )
    ndim = raw[3]
    if ndim != want_ndim:
        hint = f"; did you swap the {kind} and {other} files?" if ndim in (1, 3) else ""
        raise DataError(
            f"{path}: IDX file has {ndim} dimensions, an IDX {kind} file has {want_ndim}{hint}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: the IDX header is cut short; the file is truncated, download it again"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "is truncated" if len(raw) < expected else "has extra bytes after the data"
        raise DataError(
            f"{path}: {what}: its header announces {kind} of shape {tuple(dims)}, i.e. {expected} "
            f"bytes, but it holds {len(raw)} bytes; download the file again"
        )
    if dims[0] == 0:
        raise DataError(f"{path}: the file holds no {kind}")
    if 0 in dims[1:]:
        raise DataError(f"{path}: the file holds images of {dims[1]}x{dims[2]} pixels: empty")
    return np.frombuffer(raw, np.uint8, count=expected - header, offset=header).reshape(dims)


def load_idx(images_path: str | Path, labels_path: str | Path) -> Dataset:
    """MNIST / Fashion-MNIST IDX files (raw or gzipped): images (N, H, W) and labels (N,)."""
    images_path, labels_path = Path(images_path), Path(labels_path)
    images = _parse_idx(_read_bytes(images_path), images_path, "images")
    labels = _parse_idx(_read_bytes(labels_path), labels_path, "labels")
    if len(labels) != len(images):
        raise DataError(
            f"{labels_path}: holds {len(labels)} labels but {images_path} holds {len(images)} "
            "images; the two files must come from the same set (train with train, t10k with t10k)"
        )
    return _labels_to_dataset(
        _u8_to_unit(images)[:, None, :, :], labels, images_path.name, _stored(images, 255)
    )


# ---------------------------------------------------------------- CIFAR-10


def _cifar_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "cifar-10-batches-bin").is_dir():  # the directory the official tarball unpacks
        path = path / "cifar-10-batches-bin"
    names = CIFAR_TRAIN_FILES if split == "train" else CIFAR_TEST_FILES
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise DataError(
            f"{path}: CIFAR-10 {split} files missing: {', '.join(missing)}; unpack the binary "
            "version (cifar-10-binary.tar.gz) there, or give a single .bin batch file"
        )
    return [path / n for n in names]


def _cifar_records(path: Path) -> np.ndarray:
    """Validated (n, 3073) uint8 records of one CIFAR-10 binary batch file."""
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % CIFAR_RECORD_BYTES:
        raise DataError(
            f"{path}: {len(raw)} bytes is not a whole number of {CIFAR_RECORD_BYTES}-byte CIFAR-10 "
            "records (1 label byte + 3x32x32 pixel bytes); the file is truncated or is not a "
            "CIFAR-10 binary batch"
        )
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD_BYTES)
    bad = np.flatnonzero(records[:, 0] > 9)
    if len(bad):
        raise DataError(
            f"{path}: record {bad[0]} has label {records[bad[0], 0]}, but CIFAR-10 labels are "
            "0..9; this is not a CIFAR-10 binary batch (CIFAR-100 records have 2 label bytes)"
        )
    return records


def load_cifar10(path: str | Path, split: str = "train") -> Dataset:
    """CIFAR-10 binary version: a directory with data_batch_1..5.bin / test_batch.bin, or
    one .bin file (``split`` is then ignored). Images are 3x32x32."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    parts = [_cifar_records(f) for f in _cifar_files(path, split)]
    n = sum(len(p) for p in parts)
    # Convert file by file into one preallocated array: never two float copies of the set.
    x = np.empty((n, 3, 32, 32), np.float32)
    y = np.empty(n, np.int64)
    at = 0
    for records in parts:
        k = len(records)
        np.divide(records[:, 1:].reshape(k, 3, 32, 32), np.float32(255), out=x[at : at + k])
        y[at : at + k] = records[:, 0]
        at += k
    return Dataset(x, y, 10, f"cifar10:{path.name}", "uint8 0..255 divided by 255")


# ---------------------------------------------------------------- npz


def array_images(x: np.ndarray, path: Path) -> tuple[np.ndarray, str]:
    """Images of an array file as float32 (N, C, H, W), and how their values were made."""
    pixels = _stored(x, 255) if x.dtype.kind in "uib" and x.size else f"{x.dtype} as stored"
    return images_from_array(x, f"{path}: 'x'"), pixels


def images_from_array(x: np.ndarray, where: str) -> np.ndarray:
    """Any accepted image array -> float32 (N, C, H, W) in training's scale, or one DataError.

    Layouts: (N, H, W) grey, (N, C, H, W), or (N, H, W, C) with C 1 or 3 (a 3-D array is
    always N grey images, never one colour image). uint8 and other integers in 0..255 are
    divided by 255, as every loader does; floats are taken as they are and must be finite.
    ``where`` names the array in messages, e.g. "images.npz: 'x'".
    """
    if x.dtype.kind not in "biuf":  # strings, objects, structured records, complex, dates
        raise DataError(
            f"{where} has dtype {x.dtype}; save the images as uint8 (0..255) or float32 "
            "(as training scaled them)"
        )
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4:
        # Channels-first is the native layout; a trailing axis of 1 or 3 means channels-last.
        if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{where} has shape {x.shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C) "
            "with C 1 or 3"
        )
    if x.shape[0] == 0:
        raise DataError(f"{where} holds no images (shape {x.shape})")
    if 0 in x.shape[1:]:
        c, h, w = x.shape[1:]
        raise DataError(f"{where} has shape {x.shape}: empty images ({c}x{h}x{w}, CxHxW)")
    if x.dtype == np.uint8:
        return _u8_to_unit(x)
    if x.dtype.kind in "biu":
        if x.min() < 0 or x.max() > 255:
            raise DataError(
                f"{where} is {x.dtype} with values {x.min()}..{x.max()}; integer images must "
                "be 0..255 (or save float32 in [0, 1])"
            )
        return _u8_to_unit(x.astype(np.uint8))
    x = x.astype(np.float32)
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise DataError(f"{where} contains {bad} NaN or infinite value(s)")
    return x


def _npz_labels(y: np.ndarray, n: int, path: Path) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(
            f"{path}: 'y' is {y.dtype} of shape {y.shape}; expected integer class labels, "
            "shape (N,)"
        )
    if len(y) != n:
        raise DataError(f"{path}: 'x' holds {n} images but 'y' holds {len(y)} labels")
    if y.min() < 0:
        raise DataError(f"{path}: 'y' contains negative labels ({y.min()}); labels are 0..K-1")
    return y.astype(np.int64)


def load_npz(path: str | Path, labels: bool = True) -> Dataset:
    """An .npz with arrays ``x`` (images) and ``y`` (integer labels; with ``labels=False``
    optional, as for predict); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not zipfile.is_zipfile(path):  # np.load would also take .npy and pickles: refuse both
        raise DataError(
            f"{path}: not a valid .npz file (not a zip archive); save it with "
            "np.savez(path, x=images, y=labels)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y")[: 1 + labels] if k not in f.files]
            if missing:
                raise DataError(
                    f"{path}: no array named {' or '.join(map(repr, missing))} (found: "
                    f"{', '.join(f.files) or 'nothing'}); save with "
                    "np.savez(path, x=images, y=labels)"
                )
            x = f["x"]
            y = f["y"] if "y" in f.files else None
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e):
            raise DataError(
                f"{path}: holds an object (pickled) array, which cnnspec never loads; save plain "
                "numeric arrays (e.g. x as uint8, y as int64)"
            ) from None
        raise DataError(f"{path}: not a valid .npz file ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: not a valid .npz file ({e}); re-create it with numpy.savez"
        ) from None
    images, pixels = array_images(x, path)
    y = np.zeros(len(images), np.int64) if y is None else _npz_labels(y, len(images), path)
    return _labels_to_dataset(images, y, path.name, pixels)


# ---------------------------------------------------------------- dispatch


def _idx_candidates(directory: Path, prefix: str, kind: str) -> list[Path]:
    ndim = 3 if kind == "images" else 1
    # Both the official dash spelling and the dotted one common in mirrors (…-images.idx3-ubyte).
    stems = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    return [directory / (s + gz) for s in stems for gz in ("", ".gz")]


def _load_directory(directory: Path, split: str) -> Dataset:
    prefix = "train" if split == "train" else "t10k"
    images = [p for p in _idx_candidates(directory, prefix, "images") if p.is_file()]
    labels = [p for p in _idx_candidates(directory, prefix, "labels") if p.is_file()]
    if images and labels:
        ds = load_idx(images[0], labels[0])
        ds.name = f"{directory.name}:{split}"
        return ds
    if images or labels:
        have, want = (images[0], "labels") if images else (labels[0], "images")
        raise DataError(f"{directory}: found {have.name} but no matching {prefix}-{want} IDX file")
    cifar_dir = directory / "cifar-10-batches-bin"
    if any(
        (d / n).is_file()
        for d in (directory, cifar_dir)
        for n in CIFAR_TRAIN_FILES + CIFAR_TEST_FILES
    ):
        return load_cifar10(directory, split)
    raise DataError(
        f"{directory}: no recognisable data; looked for {prefix}-images-idx3-ubyte[.gz] with "
        f"{prefix}-labels-idx1-ubyte[.gz] (MNIST / Fashion-MNIST) and for CIFAR-10 "
        "data_batch_N.bin / test_batch.bin"
    )


def load_data(source: str, split: str = "train") -> Dataset:
    """Load ``source``: "digits" (built in), a .npz file, a directory of MNIST-style IDX files
    or of CIFAR-10 binary batches, a single CIFAR-10 .bin file, or "images.idx,labels.idx".

    ``split`` ("train" or "test") picks the files of a directory and the held-out part of the
    digits; a single file or an explicit pair is used as is.
    """
    if split not in SPLITS and not (source == "digits" and split == "all"):
        raise DataError(f"unknown split {split!r}; use {' or '.join(SPLITS)}")
    if source == "digits":
        return load_builtin_digits(split)
    if "," in source:
        parts = [p.strip() for p in source.split(",")]
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{source!r}: give exactly two files, 'images-file,labels-file'")
        return load_idx(parts[0], parts[1])
    path = Path(source)
    if path.is_dir():
        return _load_directory(path, split)
    if not path.exists():
        raise DataError(
            f"{source}: no such file or directory; give 'digits', a .npz file, a directory of "
            "MNIST-style IDX or CIFAR-10 binary files, or 'images.idx,labels.idx'"
        )
    name = path.name.lower()
    if name.endswith(".npz") or zipfile.is_zipfile(path):
        return load_npz(path)
    if name.endswith(".bin"):
        return load_cifar10(path, split)
    if "idx" in name:
        raise DataError(f"{source}: an IDX file needs its partner; give 'images-file,labels-file'")
    raise DataError(
        f"{source}: unknown data format; expected a .npz file (arrays x, y), a CIFAR-10 .bin "
        "batch, a directory, or 'images.idx,labels.idx'"
    )


# ---------------------------------------------------------------- adapting to a spec


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize float32 (N, C, h, w) images to (N, C, height, width), vectorised over images."""
    n, c, h, w = x.shape
    r0, r1, wr = bilinear_taps(h, height)
    c0, c1, wc = bilinear_taps(w, width)
    out = np.empty((n, c, height, width), np.float32)
    # Chunks bound the temporaries to about 16 MB whatever the set's size.
    chunk = max(1, (1 << 22) // (c * height * max(w, width)))
    for s in range(0, n, chunk):
        block = x[s : s + chunk]
        top, bottom = block[:, :, r0, :], block[:, :, r1, :]
        rows = top + (bottom - top) * wr[:, None]
        left, right = rows[..., c0], rows[..., c1]
        out[s : s + chunk] = left + (right - left) * wc
    return out


def fit_to_input(ds: Dataset, input_shape: tuple[int, int, int] | list[int]) -> Dataset:
    """Make the images match a spec's input [C, H, W]: bilinear resize, grey -> RGB copy."""
    channels, height, width = (int(d) for d in input_shape)
    c, h, w = ds.image_shape
    x = ds.x
    if c != channels:
        if not (c == 1 and channels == 3):
            fix = "convert the images to grey-scale" if channels == 1 else "use matching data"
            raise DataError(
                f"{ds.name}: the data has {c} channel{'s' * (c != 1)} but the spec's input expects "
                f"{channels}; {fix} or change the spec's input to [{c}, {height}, {width}]"
            )
    if (h, w) != (height, width):
        x = resize_bilinear(x, height, width)
    if c != channels:  # after resizing, so only one channel is resampled
        x = np.ascontiguousarray(np.broadcast_to(x, (len(x), 3, height, width)))
    if x is ds.x:
        return ds
    return Dataset(x, ds.y, ds.num_classes, ds.name, ds.pixels)


def input_range(ds: Dataset) -> dict:
    """The values a network sees from ``ds`` and how they were made: training records it in
    the checkpoint, predict and eval compare their inputs with it."""
    lo, hi = (float(v) for v in (ds.x.min(), ds.x.max())) if len(ds) else (0.0, 0.0)
    return {"range": [lo, hi], "pixels": ds.pixels or "float32 as given"}


def range_mismatch(found: dict, trained: dict | None) -> str | None:
    """A sentence when inputs lie far from the training range (a quarter of its span or
    less, or half a span beyond it): another scaling, e.g. 0..16 divided by 255 where
    training divided by 16, or 0..255 floats where training saw 0..1."""
    if not trained or "range" not in trained:
        return None  # weights from elsewhere: nothing to compare with
    (lo, hi), (tlo, thi) = found["range"], trained["range"]
    span = thi - tlo
    if span <= 0 or not (hi - lo <= span / 4 or hi > thi + span / 2 or lo < tlo - span / 2):
        return None
    return (
        f"the inputs are {lo:.4g}..{hi:.4g} ({found['pixels']}), but the model was trained on "
        f"{tlo:.4g}..{thi:.4g} ({trained.get('pixels', 'unknown scaling')}); scale them the "
        "same way"
    )


def check_labels(ds: Dataset, num_outputs: int) -> None:
    """Refuse labels the network cannot represent (label >= number of output units)."""
    if len(ds) == 0:
        raise DataError(f"{ds.name}: the data set is empty")
    top = int(ds.y.max())
    if top >= num_outputs or int(ds.y.min()) < 0:
        raise DataError(
            f"{ds.name}: labels go up to {top} ({top + 1} classes) but the network has only "
            f"{num_outputs} output units; give the spec's last layer at least {top + 1} outputs"
        )


def split_dataset(
    ds: Dataset, val_fraction: float, seed: int, stratify: bool = True
) -> tuple[Dataset, Dataset]:
    """Deterministic (train, val) division; stratified by label unless ``stratify`` is False.

    Stratifying trick: shuffle, stable-sort by label (classes become contiguous blocks in
    random order inside), then take evenly spaced positions. Each class then gets its share
    to within one image, and the total is exactly round(N * val_fraction).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    n = len(ds)
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise DataError(
            f"{ds.name}: {n} images are too few to hold out a fraction {val_fraction} "
            "for validation"
        )
    order = np.random.default_rng(seed).permutation(n)
    if stratify:
        order = order[np.argsort(ds.y[order], kind="stable")]
    picked = ((np.arange(n_val) + 0.5) * (n / n_val)).astype(np.int64)
    is_val = np.zeros(n, bool)
    is_val[order[picked]] = True
    return (
        ds.subset(np.flatnonzero(~is_val), f"{ds.name}:train"),
        ds.subset(np.flatnonzero(is_val), f"{ds.name}:val"),
    )


# The brief's name; ``split`` is also a common local variable name, hence the long alias.
split = split_dataset


# ---------------------------------------------------------------- mini-batches


class Batches:
    """Mini-batches written into buffers allocated once (the compiled model has static shapes).

    Iterating yields ``(x, y, n)``: the SAME ``x`` float32 (B, C, H, W) and ``y`` int64 (B,)
    arrays every step, overwritten in place, and ``n`` the number of real images. With
    ``drop_last`` (training) every batch is full; otherwise the last partial batch is padded
    with zeros and ``n`` < B tells the caller how many rows count.

    ``shuffle`` draws one permutation per epoch from ``rng``; augmentation (``crop_padding``:
    zero-pad by that many pixels and crop back at a random offset; ``hflip``: mirror with
    probability 1/2) draws per image from the same generator, so one seed fixes everything.

    ``shard=(rank, replicas)`` (data-parallel training, with ``drop_last``): every replica
    draws the same permutation, cut to a multiple of ``replicas``, and takes every
    ``replicas``-th image from ``rank`` on (PyTorch's DistributedSampler); the augmentation
    numbers are drawn for the whole global batch and each replica uses its images' rows. So
    the replicas' batches of a step together are, image for image, the one-process batch of
    ``replicas * batch_size`` from the same seed.
    """

    def __init__(
        self,
        ds: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        drop_last: bool = False,
        crop_padding: int = 0,
        hflip: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.rank, self.replicas = shard or (0, 1)
        if self.replicas > 1 and not drop_last:
            raise ValueError("sharded batches need drop_last (equal steps on every replica)")
        if (shuffle or crop_padding or hflip) and rng is None:
            raise ValueError("shuffling and augmentation need a numpy Generator (rng=...)")
        self.ds, self.batch_size, self.rng = ds, batch_size, rng
        self.shuffle, self.drop_last = shuffle, drop_last
        self.crop_padding, self.hflip = int(crop_padding), bool(hflip)
        c, h, w = ds.image_shape
        p = self.crop_padding
        self.x = np.zeros((batch_size, c, h, w), np.float32)
        self.y = np.zeros(batch_size, np.int64)
        self.augment = p > 0 or self.hflip
        # Staging buffer for augmentation; its zero border is never written, so it stays zero.
        self._padded = (
            np.zeros((batch_size, c, h + 2 * p, w + 2 * p), np.float32) if self.augment else None
        )
        # per image of the global batch: dy, dx, flip
        self._uniform = np.empty((self.replicas * batch_size, 3), np.float64)

    def __len__(self) -> int:
        n, b = len(self.ds) // self.replicas, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        return self.epoch()

    def epoch(self, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """One pass; ``start`` skips that many batches while consuming exactly the random
        numbers they would have used, so a resumed epoch continues identically."""
        n_total, b = len(self.ds), self.batch_size
        order = self.rng.permutation(n_total) if self.shuffle else np.arange(n_total)
        if self.replicas > 1:
            order = order[: n_total - n_total % self.replicas][self.rank :: self.replicas]
        for step in range(len(self)):
            index = order[step * b : (step + 1) * b]
            n = len(index)
            if self.augment:
                self.rng.random(out=self._uniform[: n * self.replicas])
            if step < start:
                continue
            np.take(self.ds.x, index, axis=0, out=self.x[:n], mode="clip")
            np.take(self.ds.y, index, axis=0, out=self.y[:n], mode="clip")
            if n < b:  # padded evaluation batch: deterministic filler, never counted
                self.x[n:] = 0.0
                self.y[n:] = 0
            if self.augment:
                self._augment(n)
            yield self.x, self.y, n

    def _augment(self, n: int) -> None:
        from ..kernels.cpu.augment import crop_flip

        mine = self._uniform[self.rank :: self.replicas]
        crop_flip(self.x, self._padded, mine, n, self.crop_padding, self.hflip)
