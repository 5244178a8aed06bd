"""What `predict` reads: image files (PNG, JPEG, ... through Pillow), folders of them,
and .npy/.npz arrays, made into the spec's input as training makes its data: the same
pixel scaling (8-bit values divided by 255), grey or RGB as the spec's channels, the
same bilinear resize. Each input keeps a name for the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..train.data import DataError, Dataset, array_images, fit_to_input, load_npz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ARRAY_SUFFIXES = (".npy", ".npz")


def _pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise DataError(
            "reading image files needs Pillow: pip install 'cnnspec[images]' "
            "(or give .npy/.npz arrays)"
        ) from None
    return Image, ImageOps


def _files(paths: list[str]) -> list[Path]:
    """Files as given; a folder's image and array files, sorted by name."""
    files = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            found = sorted(
                f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise DataError(
                    f"{given}: a folder without image files ({', '.join(IMAGE_SUFFIXES)})"
                )
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{given}: no such file or folder")
    return files


def read_image(path: Path, channels: int) -> tuple[np.ndarray, str]:
    """One image as float32 (C, H, W) in [0, 1]: grey for one channel, RGB for three (as
    Pillow converts: ITU-R 601 luma, alpha dropped), upright by its EXIF orientation."""
    Image, ImageOps = _pillow()
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16"):  # 16-bit grey PNG: its own full scale
                a = np.asarray(img, np.uint16).astype(np.float32) / 65535
                x = a[None] if channels == 1 else np.repeat(a[None], channels, axis=0)
                return x, "16-bit 0..65535 divided by 65535"
            mode = "L" if channels == 1 else "RGB"
            a = np.asarray(img.convert(mode))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    x = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return np.divide(x, np.float32(255), dtype=np.float32), "8-bit 0..255 divided by 255"


def _read_npy(path: Path, channels: int) -> Dataset:
    """(H, W), (C, H, W) with the spec's channels, (N, H, W) or (N, C, H, W), with the
    dtypes and value checks of an .npz file's images."""
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3 and x.shape[0] == channels:
        x = x[None]
    images, pixels = array_images(x, path)
    return Dataset(images, np.zeros(len(images), np.int64), 1, path.name, pixels)


def read_inputs(paths: list[str], input_shape) -> tuple[Dataset, list[str]]:
    """Every input, fitted to `input_shape`, and a name for each (FILE or FILE[i])."""
    channels, height, width = (int(v) for v in input_shape)
    parts, names, pixels = [], [], []
    files = _files(paths)
    for f in files:
        suffix = f.suffix.lower()
        if suffix in ARRAY_SUFFIXES:
            ds = _read_npy(f, channels) if suffix == ".npy" else load_npz(f, labels=False)
            ds = fit_to_input(ds, input_shape)
            parts.append(ds.x)
            names += [f"{f}[{i}]" for i in range(len(ds))] if len(ds) > 1 else [str(f)]
            pixels.append(ds.pixels)
        elif suffix in IMAGE_SUFFIXES:
            x, how = read_image(f, channels)
            one = Dataset(x[None], np.zeros(1, np.int64), 1, f.name, how)
            parts.append(fit_to_input(one, (channels, height, width)).x)
            names.append(str(f))
            pixels.append(how)
        else:
            raise DataError(
                f"{f}: not an image or array file; give {', '.join(IMAGE_SUFFIXES)}, "
                ".npy or .npz files, or folders of images"
            )
    x = np.concatenate(parts) if len(parts) > 1 else parts[0]
    how = "; ".join(dict.fromkeys(p for p in pixels if p))
    name = str(files[0]) if len(files) == 1 else f"{len(names)} inputs"
    return Dataset(np.ascontiguousarray(x), np.zeros(len(x), np.int64), 1, name, how), names


def read_labels(path: str, classes: int) -> list[str]:
    """Class names, one a line (trailing blank lines ignored), exactly one per class."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the labels ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: labels must be UTF-8 text, one class name a line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != classes:
        raise DataError(
            f"{path}: {len(lines)} label lines, but the network has {classes} classes; "
            "give one name a line, in class order"
        )
    return [line.strip() for line in lines]
