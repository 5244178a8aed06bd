"""Checkpoint files: round trip, no pickle, clear errors, atomic replacement, spec hashes."""

import json
import zipfile

import numpy as np
import pytest

from cnnspec.train import checkpoint as ck
from cnnspec.train.checkpoint import (
    CheckpointError,
    check_spec_hash,
    load_checkpoint,
    save_checkpoint,
    spec_hash,
)


def sample_arrays(value=1.0):
    return {
        "param/conv1.weight": np.full((4, 3, 3, 3), value, np.float32),
        "param/fc.bias": np.arange(10, dtype=np.float64),
        "optim/steps": np.array(17, np.int64),
        "flags": np.array([True, False]),
    }


def test_round_trip(tmp_path):
    path = tmp_path / "c.npz"
    meta = {"epoch": 3, "history": [{"loss": 0.5, "acc": None}], "big": 2**100, "name": "é"}
    save_checkpoint(path, sample_arrays(), meta)
    arrays, got = load_checkpoint(path)
    assert got == meta
    assert arrays.keys() == sample_arrays().keys()
    for k, v in sample_arrays().items():
        assert arrays[k].dtype == v.dtype and arrays[k].shape == v.shape
        np.testing.assert_array_equal(arrays[k], v)
    # A plain npz to numpy, metadata a uint8 array holding JSON.
    with np.load(path, allow_pickle=False) as f:
        assert json.loads(f["__meta__"].tobytes())["version"] == ck.FORMAT_VERSION
    assert not list(tmp_path.glob(".*tmp"))


def test_save_refuses_object_arrays_and_bad_names(tmp_path):
    with pytest.raises(ValueError, match="numeric"):
        save_checkpoint(tmp_path / "c.npz", {"a": np.array([{}, 1], dtype=object)}, {})
    with pytest.raises(ValueError, match="invalid"):
        save_checkpoint(tmp_path / "c.npz", {"__meta__": np.zeros(1)}, {})
    assert not list(tmp_path.iterdir())


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(CheckpointError, match="not an .npz/zip"):
        load_checkpoint(tmp_path / "text.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="no __meta__"):
        load_checkpoint(tmp_path / "plain.npz")


def test_wrong_format_version(tmp_path):
    meta = json.dumps({"format": ck.FORMAT, "version": 99, "meta": {}}).encode()
    np.savez(tmp_path / "future.npz", __meta__=np.frombuffer(meta, np.uint8))
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        load_checkpoint(tmp_path / "future.npz")


def test_pickled_array_inside_is_refused(tmp_path):
    meta = json.dumps({"format": ck.FORMAT, "version": 1, "meta": {}}).encode()
    np.savez(
        tmp_path / "evil.npz",
        __meta__=np.frombuffer(meta, np.uint8),
        w=np.array([{"x": 1}], dtype=object),
    )
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(tmp_path / "evil.npz")


def test_truncated_file(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, sample_arrays(), {"epoch": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_crash_mid_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.npz"
    save_checkpoint(path, sample_arrays(1.0), {"epoch": 1})
    before = path.read_bytes()
    real_write = np.lib.format.write_array
    calls = []

    def failing_write(fp, array, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first array is written, the second one "crashes"
            fp.write(b"partial")
            raise OSError("disk full")
        return real_write(fp, array, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, sample_arrays(2.0), {"epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    arrays, meta = load_checkpoint(path)
    assert meta == {"epoch": 1} and arrays["param/conv1.weight"][0, 0, 0, 0] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.npz"]  # no temporary left


def test_crash_before_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.npz"
    save_checkpoint(path, sample_arrays(1.0), {"epoch": 1})

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, sample_arrays(2.0), {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)[1] == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.npz"]


def test_written_zip_is_uncompressed_and_complete(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, sample_arrays(), {})
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}


def test_spec_hash_is_canonical():
    spec = {"name": "lenet", "input": [1, 28, 28], "layers": [{"conv": {"filters": 6}}]}
    reordered = {"layers": [{"conv": {"filters": 6}}], "input": [1, 28, 28], "name": "lenet"}
    yaml_text = "# a comment\nname: lenet\ninput: [1, 28, 28]\nlayers:\n  - conv: {filters: 6}\n"
    h = spec_hash(spec)
    assert len(h) == 64 and int(h, 16) >= 0
    assert spec_hash(reordered) == h
    assert spec_hash(json.dumps(spec, indent=4)) == h
    assert spec_hash(yaml_text) == h
    assert spec_hash({**spec, "input": [1, 32, 32]}) != h


def test_check_spec_hash(tmp_path):
    check_spec_hash({"spec_hash": "a" * 64}, "a" * 64, tmp_path)
    check_spec_hash({"spec_hash": None}, "a" * 64, tmp_path)  # unknown: nothing to compare
    with pytest.raises(CheckpointError, match="different spec"):
        check_spec_hash({"spec_hash": "a" * 64}, "b" * 64, tmp_path)
