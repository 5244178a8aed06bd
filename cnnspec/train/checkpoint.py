"""Checkpoints: one .npz of plain arrays plus JSON metadata, written atomically, never pickled.

Layout: every array is stored as ``<key>.npy`` in an uncompressed zip (so ``numpy.load`` reads
it), and the metadata is UTF-8 JSON stored as a uint8 array under ``__meta__``:
``{"format": "cnnspec-checkpoint", "version": 1, "meta": {...caller's meta...}}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "cnnspec-checkpoint"
FORMAT_VERSION = 1
META_KEY = "__meta__"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is meant for the user."""


FAULT_ENV = "CNNSPEC_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die here, as kill -9 would, when $CNNSPEC_FAULT names this point (``NAME`` or
    ``NAME#K``: the K-th time it is reached). The fault-injection tests stop the trainer at
    each write boundary (``before:best.npz``, ``during:last.npz``: written, not yet renamed,
    ``after:metrics.jsonl``, ...) and after a chosen step (``step:N``), then check that a
    resume ends exactly where an uninterrupted run ends."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or not wanted.startswith(name):
        return
    _fault_hits[name] = hits = _fault_hits.get(name, 0) + 1
    if wanted in (name, f"{name}#{hits}"):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) everywhere.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``arrays`` and JSON-serialisable ``meta`` to ``path`` atomically.

    The data goes to a temporary file in the same directory, is flushed and fsynced, and only
    then renamed over ``path``: a crash at any point leaves either the old or the new file.
    """
    path = Path(path)
    for key, a in arrays.items():
        if key == META_KEY or not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid checkpoint array name {key!r}")
        if not isinstance(a, np.ndarray) or a.dtype.hasobject:
            raise ValueError(f"checkpoint array {key!r} must be a numeric numpy array")
    wrapped = {"format": FORMAT, "version": FORMAT_VERSION, "meta": meta}
    meta_bytes = np.frombuffer(json.dumps(wrapped, sort_keys=True).encode("utf-8"), np.uint8)

    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            # Stored, not deflated: weights barely compress and saving must stay quick.
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key, a in [*arrays.items(), (META_KEY, meta_bytes)]:
                    with zf.open(key + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"during:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)


def load_checkpoint(
    path: str | Path, meta_only: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(arrays, meta)``; with
    ``meta_only`` the arrays are not read (``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a cnnspec checkpoint (not an .npz/zip file)")
    try:
        with np.load(path, allow_pickle=False) as f:
            if META_KEY not in f.files:
                raise CheckpointError(
                    f"{path}: an .npz file but not a cnnspec checkpoint (no {META_KEY} entry)"
                )
            wrapped = json.loads(f[META_KEY].tobytes().decode("utf-8"))
            if not isinstance(wrapped, dict) or wrapped.get("format") != FORMAT:
                raise CheckpointError(f"{path}: {META_KEY} does not describe a cnnspec checkpoint")
            version = wrapped.get("version")
            if version != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path}: checkpoint format version {version} is not supported (this cnnspec "
                    f"reads version {FORMAT_VERSION}); use the cnnspec version that wrote it"
                )
            arrays = {} if meta_only else {k: f[k] for k in f.files if k != META_KEY}
    except CheckpointError:
        raise
    except ValueError as e:
        if "pickle" in str(e):
            raise CheckpointError(
                f"{path}: contains a pickled object array; refusing to load it"
            ) from None
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None
    return arrays, wrapped["meta"]


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal data gives equal text."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def spec_hash(text_or_dict: str | dict[str, Any]) -> str:
    """sha256 (hex) of a spec's canonical JSON, so formatting and comments do not matter.

    A string is parsed as JSON, else as YAML; a string that is neither is hashed as text.
    """
    obj: Any = text_or_dict
    if isinstance(text_or_dict, str):
        try:
            obj = json.loads(text_or_dict)
        except ValueError:
            try:
                import yaml

                obj = yaml.safe_load(text_or_dict)
            except Exception:  # unparsable text: its bytes are all we have to identify it
                obj = text_or_dict
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def check_spec_hash(meta: dict[str, Any], expected: str | None, path: str | Path) -> None:
    """Refuse a checkpoint made from another spec (no check when either hash is unknown)."""
    found = meta.get("spec_hash")
    if expected and found and found != expected:
        raise CheckpointError(
            f"{path}: this checkpoint was trained from a different spec (spec hash {found[:12]}, "
            f"the current spec has {expected[:12]}); use the spec it was trained with, or train "
            "a new model into another output directory"
        )
