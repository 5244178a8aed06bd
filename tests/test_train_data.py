"""Data loading, adaptation to a spec's input, splitting and batching (cnnspec.train.data)."""

import gzip
import struct

import numpy as np
import pytest
import torch

from cnnspec.train.data import (
    CIFAR_RECORD_BYTES,
    Batches,
    DataError,
    Dataset,
    check_labels,
    fit_to_input,
    load_builtin_digits,
    load_cifar10,
    load_data,
    load_idx,
    load_npz,
    resize_bilinear,
    split,
    split_dataset,
)

# ---------------------------------------------------------------- helpers


def idx_bytes(a: np.ndarray) -> bytes:
    a = np.asarray(a, np.uint8)
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_mnist(directory, prefix="train", n=7, size=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write = gzip.compress if gz else (lambda b: b)
    (directory / f"{prefix}-images-idx3-ubyte{suffix}").write_bytes(write(idx_bytes(images)))
    (directory / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(write(idx_bytes(labels)))
    return images, labels


def cifar_bytes(n, seed=0):
    rng = np.random.default_rng(seed)
    records = rng.integers(0, 256, (n, CIFAR_RECORD_BYTES), dtype=np.uint8)
    records[:, 0] %= 10
    return records


def make_ds(n=20, c=1, h=4, w=4, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, c, h, w), dtype=np.float32)
    y = np.arange(n, dtype=np.int64) % classes
    return Dataset(x, y, classes, "synthetic")


# ---------------------------------------------------------------- built-in digits


def test_builtin_digits_all():
    ds = load_builtin_digits("all")
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32
    assert ds.y.shape == (1797,) and ds.y.dtype == np.int64
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.num_classes == 10 and set(np.unique(ds.y)) == set(range(10))


def test_builtin_digits_train_test_are_a_fixed_disjoint_partition():
    train, test = load_data("digits", "train"), load_data("digits", "test")
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) < 1
    all_rows = {r.tobytes() for r in load_builtin_digits("all").x.reshape(1797, -1)}
    seen = [r.tobytes() for r in np.concatenate([train.x, test.x]).reshape(1797, -1)]
    assert set(seen) == all_rows
    np.testing.assert_array_equal(load_data("digits", "test").x, test.x)  # deterministic
    assert np.bincount(test.y, minlength=10).min() >= 34  # stratified: ~36 per class


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_round_trip(tmp_path, gz):
    images, labels = write_mnist(tmp_path, gz=gz)
    t_images, t_labels = write_mnist(tmp_path, "t10k", n=3, gz=gz, seed=1)
    ds = load_data(str(tmp_path))
    assert ds.x.shape == (7, 1, 5, 5) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.x[:, 0], images / np.float32(255))
    np.testing.assert_array_equal(ds.y, labels)
    test = load_data(str(tmp_path), split="test")
    np.testing.assert_array_equal(test.y, t_labels)


def test_idx_explicit_pair(tmp_path):
    images, labels = write_mnist(tmp_path, gz=False)
    ds = load_data(f"{tmp_path}/train-images-idx3-ubyte,{tmp_path}/train-labels-idx1-ubyte")
    np.testing.assert_array_equal(ds.y, labels)


def test_idx_truncated(tmp_path):
    write_mnist(tmp_path, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_idx(f, tmp_path / "train-labels-idx1-ubyte")


def test_idx_truncated_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-12])
    with pytest.raises(DataError, match="gzip data is corrupt or truncated"):
        load_data(str(tmp_path))


def test_idx_extra_bytes(tmp_path):
    write_mnist(tmp_path, gz=False)
    f = tmp_path / "train-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(DataError, match="extra bytes"):
        load_data(str(tmp_path))


def test_idx_bad_magic_and_swapped_files(tmp_path):
    write_mnist(tmp_path, gz=False)
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    with pytest.raises(DataError, match="swap"):
        load_idx(labels, images)
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match="not an IDX file"):
        load_idx(bad, labels)
    short = tmp_path / "short"
    short.write_bytes(b"\0\0\x08")
    with pytest.raises(DataError, match="too short"):
        load_idx(short, labels)


def test_idx_unsupported_element_type(tmp_path):
    f = tmp_path / "floats"
    f.write_bytes(bytes([0, 0, 0x0D, 3]) + struct.pack(">3I", 1, 1, 1) + bytes(4))
    with pytest.raises(DataError, match="element type 0x0d"):
        load_idx(f, f)


def test_idx_empty_images(tmp_path):
    (tmp_path / "i").write_bytes(idx_bytes(np.zeros((3, 0, 0))))
    (tmp_path / "l").write_bytes(idx_bytes(np.zeros(3)))
    with pytest.raises(DataError, match="images of 0x0 pixels: empty"):
        load_idx(tmp_path / "i", tmp_path / "l")


def test_idx_count_mismatch(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(6, np.uint8)))
    with pytest.raises(DataError, match="6 labels but .* 7 images"):
        load_data(str(tmp_path))


def test_idx_directory_missing_partner(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no matching train-labels"):
        load_data(str(tmp_path))


# ---------------------------------------------------------------- CIFAR-10


def test_cifar_single_file_layout(tmp_path):
    records = cifar_bytes(4)
    f = tmp_path / "data_batch_1.bin"
    f.write_bytes(records.tobytes())
    ds = load_data(str(f))
    assert ds.x.shape == (4, 3, 32, 32) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.y, records[:, 0])
    # Record layout: label, then the red plane row by row, then green, then blue.
    assert ds.x[2, 1, 3, 5] == np.float32(records[2, 1 + 1024 + 3 * 32 + 5]) / np.float32(255)


def test_cifar_directory_train_and_test(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"  # the tarball's directory, found from its parent
    root.mkdir()
    for i in range(1, 6):
        (root / f"data_batch_{i}.bin").write_bytes(cifar_bytes(2, seed=i).tobytes())
    (root / "test_batch.bin").write_bytes(cifar_bytes(3, seed=9).tobytes())
    train = load_data(str(tmp_path))
    assert len(train) == 10
    np.testing.assert_array_equal(train.y[8:], cifar_bytes(2, seed=5)[:, 0])
    assert len(load_data(str(tmp_path), "test")) == 3
    (root / "data_batch_4.bin").unlink()
    with pytest.raises(DataError, match="data_batch_4.bin"):
        load_cifar10(tmp_path)


def test_cifar_size_not_a_multiple(tmp_path):
    f = tmp_path / "data_batch_1.bin"
    f.write_bytes(cifar_bytes(2).tobytes()[:-1])
    with pytest.raises(DataError, match="not a whole number of 3073-byte"):
        load_data(str(f))
    f.write_bytes(b"")
    with pytest.raises(DataError, match="0 bytes"):
        load_data(str(f))


def test_cifar_bad_label(tmp_path):
    records = cifar_bytes(3)
    records[1, 0] = 57
    f = tmp_path / "x.bin"
    f.write_bytes(records.tobytes())
    with pytest.raises(DataError, match="record 1 has label 57"):
        load_data(str(f))


# ---------------------------------------------------------------- npz


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((5, 6, 7), (5, 1, 6, 7)),
        ((5, 3, 6, 7), (5, 3, 6, 7)),
        ((5, 6, 7, 3), (5, 3, 6, 7)),
        ((5, 6, 7, 1), (5, 1, 6, 7)),
        ((5, 2, 6, 7), (5, 2, 6, 7)),
    ],
)
def test_npz_layouts(tmp_path, shape, expected):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    ds = load_npz(tmp_path / "d.npz")
    assert ds.x.shape == expected and ds.x.dtype == np.float32
    if len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3):
        np.testing.assert_array_equal(ds.x, x.transpose(0, 3, 1, 2) / np.float32(255))
    assert ds.x.max() <= 1.0


def test_npz_float_kept_and_labels(tmp_path):
    x = np.linspace(0, 1, 2 * 16, dtype=np.float64).reshape(2, 4, 4)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([[3], [1]], np.int32))
    ds = load_data(str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(ds.x[:, 0], x.astype(np.float32))
    assert ds.y.tolist() == [3, 1] and ds.y.dtype == np.int64 and ds.num_classes == 4


def test_npz_object_array_refused(tmp_path):
    x = np.empty(2, dtype=object)
    x[:] = [np.zeros((2, 2)), np.ones((2, 2))]
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(2))
    with pytest.raises(DataError, match="pickled"):
        load_npz(tmp_path / "d.npz")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((2, 3, 3))}, "no array named 'x' or 'y'"),
        ({"x": np.zeros((2, 3, 3)), "y": np.zeros(2)}, "integer class labels"),
        ({"x": np.zeros((2, 3, 3)), "y": np.zeros(3, int)}, "2 images but 'y' holds 3"),
        ({"x": np.zeros((2, 3)), "y": np.zeros(2, int)}, "expected \\(N, H, W\\)"),
        ({"x": np.full((2, 3, 3), np.nan), "y": np.zeros(2, int)}, "NaN"),
        ({"x": np.full((2, 3, 3), 300), "y": np.zeros(2, int)}, "0..255"),
        ({"x": np.zeros((2, 3, 3)), "y": -np.ones(2, int)}, "negative"),
        ({"x": np.zeros((2, 0, 0)), "y": np.zeros(2, int)}, "empty images \\(1x0x0"),
        ({"x": np.zeros((2, 0, 8)), "y": np.zeros(2, int)}, "empty images \\(1x0x8"),
        ({"x": np.zeros((0, 8, 8)), "y": np.zeros(0, int)}, "holds no images"),
        ({"x": np.zeros((2, 3, 3), complex), "y": np.zeros(2, int)}, "dtype complex128"),
        ({"x": np.array([["a"]] * 2), "y": np.zeros(2, int)}, "dtype <U1"),
    ],
)
def test_npz_bad_content(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_npz(tmp_path / "d.npz")


def test_npz_not_a_zip(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"this is not a zip file at all")
    with pytest.raises(DataError, match="not a valid .npz"):
        load_data(str(tmp_path / "d.npz"))


# ---------------------------------------------------------------- dispatch errors


def test_load_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_data(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="looked for train-images-idx3-ubyte"):
        load_data(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown data format"):
        load_data(str(tmp_path / "notes.txt"))
    with pytest.raises(DataError, match="unknown split"):
        load_data("digits", "validation")
    with pytest.raises(DataError, match="file not found"):
        load_data(f"{tmp_path}/a,{tmp_path}/b")


# ---------------------------------------------------------------- fit_to_input


@pytest.mark.parametrize("size", [(32, 32), (5, 11), (3, 3), (8, 8), (17, 6)])
def test_resize_matches_torch_bilinear(size):
    x = np.random.default_rng(1).random((3, 2, 8, 9), dtype=np.float32)
    ours = resize_bilinear(x, *size)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=size, mode="bilinear", align_corners=False
    ).numpy()
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


def test_fit_to_input_resize_and_grey_to_rgb():
    ds = load_builtin_digits("all")
    fitted = fit_to_input(ds, [3, 32, 32])
    assert fitted.x.shape == (1797, 3, 32, 32)
    np.testing.assert_array_equal(fitted.x[:, 0], fitted.x[:, 2])
    assert 0.0 <= fitted.x.min() and fitted.x.max() <= 1.0
    np.testing.assert_array_equal(fitted.y, ds.y)
    assert fit_to_input(ds, (1, 8, 8)) is ds


def test_fit_to_input_channel_mismatch():
    ds = make_ds(c=3)
    with pytest.raises(DataError, match="the data has 3 channels but the spec's input expects 1"):
        fit_to_input(ds, [1, 4, 4])


def test_check_labels():
    ds = make_ds(classes=4)
    check_labels(ds, 4)
    with pytest.raises(DataError, match="labels go up to 3 .*only 3 output units"):
        check_labels(ds, 3)


# ---------------------------------------------------------------- split


def test_split_deterministic_stratified_partition():
    ds = load_builtin_digits("all")
    train, val = split(ds, 0.1, seed=3)
    assert len(val) == 180 and len(train) == 1797 - 180
    counts = np.bincount(val.y, minlength=10)
    expected = np.bincount(ds.y) * 0.1
    assert np.all(np.abs(counts - expected) <= 1)
    train2, val2 = split_dataset(ds, 0.1, seed=3)
    np.testing.assert_array_equal(val.x, val2.x)
    _, val3 = split_dataset(ds, 0.1, seed=4)
    assert not np.array_equal(val.x, val3.x)
    rows = np.concatenate([train.x, val.x]).reshape(1797, -1)
    assert len({r.tobytes() for r in rows}) == len({r.tobytes() for r in ds.x.reshape(1797, -1)})


def test_split_random_and_bad_fraction():
    ds = make_ds(n=10)
    train, val = split_dataset(ds, 0.3, seed=0, stratify=False)
    assert (len(train), len(val)) == (7, 3)
    with pytest.raises(DataError):
        split_dataset(ds, 0.0, seed=0)
    with pytest.raises(DataError, match="too few"):
        split_dataset(make_ds(n=2), 0.1, seed=0)


# ---------------------------------------------------------------- Batches


def test_batches_training_epoch_reuses_buffers_and_covers_each_image_once():
    ds = make_ds(n=23)
    ds.x[:, 0, 0, 0] = np.arange(23)  # tag each image with its index
    batches = Batches(ds, 5, shuffle=True, rng=np.random.default_rng(0), drop_last=True)
    assert len(batches) == 4
    seen, buffers = [], set()
    for x, y, n in batches:
        assert n == 5 and x.shape == (5, 1, 4, 4) and y.dtype == np.int64
        buffers.add((id(x), id(y)))
        seen += x[:, 0, 0, 0].astype(int).tolist()
        np.testing.assert_array_equal(y, ds.y[x[:, 0, 0, 0].astype(int)])
    assert buffers == {(id(batches.x), id(batches.y))}
    assert len(seen) == 20 and len(set(seen)) == 20
    second = [int(v) for x, _, _ in batches for v in x[:, 0, 0, 0]]
    assert second != seen  # a new permutation every epoch


def test_batches_eval_pads_last_batch():
    ds = make_ds(n=12)
    out = [(x.copy(), y.copy(), n) for x, y, n in Batches(ds, 5)]
    assert [n for _, _, n in out] == [5, 5, 2]
    x, y, n = out[-1]
    np.testing.assert_array_equal(x[:2], ds.x[10:])
    assert not x[2:].any() and not y[2:].any()


def test_batches_same_seed_same_stream_and_skip():
    ds = make_ds(n=30, h=6, w=6)

    def run(seed, start=0):
        b = Batches(
            ds,
            4,
            shuffle=True,
            rng=np.random.default_rng(seed),
            drop_last=True,
            crop_padding=2,
            hflip=True,
        )
        return [x.copy() for x, _, _ in b.epoch(start)]

    a, b = run(7), run(7)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not np.array_equal(run(8)[0], a[0])
    # Skipping consumes the same random numbers: the remaining batches are identical.
    assert all(np.array_equal(p, q) for p, q in zip(run(7, start=3), a[3:], strict=True))


def test_batches_crop_and_flip_are_shifted_mirrored_copies():
    rng = np.random.default_rng(0)
    ds = Dataset(rng.random((64, 2, 5, 5), dtype=np.float32) + 1, np.zeros(64, np.int64), 1, "s")
    b = Batches(ds, 64, shuffle=False, rng=np.random.default_rng(1), crop_padding=2, hflip=True)
    x, _, _ = next(iter(b))
    flips = 0
    for i in range(64):
        padded = np.pad(ds.x[i], ((0, 0), (2, 2), (2, 2)))
        matches = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if np.array_equal(
                x[i],
                (padded[:, dy : dy + 5, dx : dx + 5])[:, :, ::-1]
                if flip
                else padded[:, dy : dy + 5, dx : dx + 5],
            )
        ]
        assert matches, f"image {i} is not a crop of its padded original"
        flips += matches[0][2]
    assert 16 < flips < 48  # about half mirrored
    assert not np.array_equal(x, ds.x)  # something was augmented


@pytest.mark.parametrize(
    "shape, n, p, hflip",
    [((64, 1, 32, 32), 64, 2, False), ((9, 3, 5, 7), 7, 3, True), ((4, 2, 6, 6), 4, 0, True)],
)
def test_crop_flip_kernel_matches_its_numpy_stand_in(shape, n, p, hflip):
    """The augmentation kernel and the numpy loop that stands in for it on a first run:
    the same images, bit for bit, from a strided view of the random numbers (a replica's
    rows), images past n untouched, the staging buffer's border still zero."""
    from cnnspec.kernels.cpu import augment

    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float32)
    uniform = rng.random((2 * shape[0], 3))[1::2]
    b, c, h, w = shape
    padded = [np.zeros((b, c, h + 2 * p, w + 2 * p), np.float32) for _ in range(2)]
    ours, ref = x.copy(), x.copy()
    augment._crop_flip.serial(ours, padded[0], uniform, n, p, hflip)
    augment._crop_flip_numpy(ref, padded[1], uniform, n, p, hflip)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours[n:], x[n:])
    assert p == 0 or not np.array_equal(ours[:n], x[:n])
    for staged in padded:
        staged[:, :, p : p + h, p : p + w] = 0
        assert not staged.any()


def test_batches_hflip_only():
    ds = make_ds(n=8)
    b = Batches(ds, 8, rng=np.random.default_rng(0), hflip=True)
    x, _, _ = next(iter(b))
    for i in range(8):
        assert np.array_equal(x[i], ds.x[i]) or np.array_equal(x[i], ds.x[i][:, :, ::-1])
