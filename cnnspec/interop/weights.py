"""Weights in and out: PyTorch state_dicts (.pt/.pth) and .safetensors files.

cnnspec's parameters already have PyTorch's layouts (conv [out, in/groups, kh, kw],
dense [out, in], batch norm weight/bias/running_mean/running_var), so a tensor maps to
a parameter by name: `LAYER.PARAM`, after the renames of an optional map (regular
expressions, first full match wins). When the names do not match but the file lists
its layers in the spec's order, as a state_dict does (torchvision's networks and
cnnspec's specs of them both follow the paper's order), tensors are matched by order:
layer by layer, with the same parameter names and shapes. Every shape is checked and
every missing or unused tensor is listed. PyTorch's `num_batches_tracked` counters
have no counterpart and are skipped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SKIPPED_SUFFIXES = ("num_batches_tracked",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class WeightsError(Exception):
    """A weights file that cannot be used; the message (and `details`) are for the user."""

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.details = details or []


# ---------------------------------------------------------------- reading files


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Named arrays of a .safetensors file or a PyTorch state_dict, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise WeightsError(
        f"{path}: unknown weights format; give a .safetensors file or a PyTorch state_dict "
        f"({', '.join(TORCH_SUFFIXES)})"
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise WeightsError(
            "reading .safetensors needs the safetensors package: pip install 'cnnspec[weights]'"
        ) from None
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # the package raises its own error types for a corrupt header
        raise WeightsError(f"{path}: not a readable .safetensors file ({exc})") from None
    return {k: _as_float(v, k, path) for k, v in tensors.items()}


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path}: reading a PyTorch file needs torch; or save the state_dict as "
            ".safetensors (safetensors.torch.save_file) and import that"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch's own errors: one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: not a readable PyTorch state_dict ({first}); only tensors are loaded "
            "(weights_only), save model.state_dict()"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict) and not torch.is_tensor(obj.get(key)):
                obj = obj[key]  # a training checkpoint that wraps the state_dict
                break
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(f"{path}: holds no state_dict of tensors; save model.state_dict()")
    return {
        k: _as_float(v.detach().to(torch.float32).numpy(), k, path)
        if v.is_floating_point()
        else v.numpy()
        for k, v in obj.items()
        if torch.is_tensor(v)
    }


def _as_float(a: np.ndarray, key: str, path: Path) -> np.ndarray:
    if a.dtype.kind == "f":
        return np.ascontiguousarray(a, np.float32)
    return a  # integer counters (num_batches_tracked); float parameters are checked later


# ---------------------------------------------------------------- renames


def read_map(path: str | os.PathLike) -> list[tuple[re.Pattern, str]]:
    """A YAML mapping of renames, FILE-NAME-PATTERN: SPEC-NAME (regular expressions
    matched against the whole tensor name; \\1 refers to a group), applied in order."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the map ({exc.strerror or exc})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise WeightsError(
            f"{path}: a map is a YAML mapping of renames, e.g. "
            "'module\\.(.*)': '\\1' or 'features\\.0\\.(weight|bias)': 'conv1.\\1'"
        )
    rules = []
    for pattern, target in data.items():
        try:
            rules.append((re.compile(pattern), target))
        except re.error as exc:
            raise WeightsError(f"{path}: {pattern!r} is not a regular expression ({exc})") from None
    return rules


def rename(name: str, rules) -> str:
    for pattern, target in rules:
        if pattern.fullmatch(name):
            return pattern.sub(target, name, count=1)
    return name


# ---------------------------------------------------------------- matching


@dataclass
class Match:
    """The outcome of matching a file's tensors to a network's parameters."""

    arrays: dict[str, np.ndarray]  # network key -> array, every parameter
    source: dict[str, str]  # network key -> the file's tensor name
    by: str  # "names" or "order"
    skipped: list[str] = field(default_factory=list)  # num_batches_tracked and the like


def network_params(net) -> dict[str, tuple]:
    """`LAYER.PARAM` -> shape of every parameter (trainable or not), in layer order."""
    return {
        f"{info.name}.{d.name}": tuple(d.shape)
        for info in net.infos
        for d in info.layer.param_defs()
    }


def match_weights(net, tensors: dict[str, np.ndarray], rules=(), by: str = "auto") -> Match:
    """Assign the file's tensors to the network's parameters (see the module's doc)."""
    if by not in ("auto", "names", "order"):
        raise ValueError(f"by must be auto, names or order, not {by!r}")
    wanted = network_params(net)
    skipped = [k for k in tensors if k.rsplit(".", 1)[-1] in SKIPPED_SUFFIXES]
    tensors = {k: v for k, v in tensors.items() if k not in skipped}
    problems: list[str] = []
    if by in ("auto", "names"):
        found = _by_names(wanted, tensors, rules)
        if isinstance(found, dict):
            return Match(*_checked(found, wanted, tensors, by="names"), "names", skipped)
        problems = found
        if by == "names":
            raise WeightsError("the file's tensors do not match the network by name", problems)
    found = _by_order(wanted, tensors)
    if isinstance(found, dict):
        return Match(*_checked(found, wanted, tensors, by="order"), "order", skipped)
    if by == "order":
        raise WeightsError("the file's tensors do not match the network in order", found)
    raise WeightsError(
        "the file's tensors match the network neither by name nor in order "
        "(add renames with --map)",
        problems + ["in order: " + line for line in found[:1]],
    )


def _by_names(wanted, tensors, rules) -> dict[str, str] | list[str]:
    renamed: dict[str, str] = {}
    for k in tensors:
        renamed.setdefault(rename(k, rules), k)
    missing = [k for k in wanted if k not in renamed]
    used = {renamed[k] for k in wanted if k in renamed}
    unused = [k for k in tensors if k not in used]
    if missing or unused:
        return _listing(missing, unused, wanted, tensors)
    return {k: renamed[k] for k in wanted}


def _listing(missing, unused, wanted, tensors, limit: int = 20) -> list[str]:
    def shown(keys, shape_of):
        more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(f"{k} {list(shape_of(k))}" for k in keys[:limit]) + more

    lines = []
    if missing:
        lines.append(f"missing ({len(missing)}): {shown(missing, wanted.get)}")
    if unused:
        lines.append(f"unused ({len(unused)}): {shown(unused, lambda k: tensors[k].shape)}")
    return lines


def _groups(keys) -> list[tuple[str, list[str]]]:
    """Keys grouped by layer (the name before the last dot), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.rpartition(".")[0], []).append(k)
    return list(groups.items())


def _by_order(wanted, tensors) -> dict[str, str] | list[str]:
    ours, theirs = _groups(wanted), _groups(tensors)
    for (layer, keys), (prefix, names) in zip(ours, theirs, strict=False):
        mine = {k.rpartition(".")[2]: wanted[k] for k in keys}
        other = {n.rpartition(".")[2]: tuple(tensors[n].shape) for n in names}
        if mine != other:

            def text(d):
                return ", ".join(f"{k} {list(v)}" for k, v in d.items())

            return [f"layer '{layer}' ({text(mine)}) meets '{prefix}' ({text(other)})"]
    if len(ours) != len(theirs):
        return [f"the network has {len(ours)} layers with parameters, the file {len(theirs)}"]
    return {
        k: f"{prefix}.{k.rpartition('.')[2]}"
        for (_, keys), (prefix, _) in zip(ours, theirs, strict=True)
        for k in keys
    }


def _checked(source, wanted, tensors, by):
    arrays, bad = {}, []
    for key, name in source.items():
        a = tensors[name]
        if tuple(a.shape) != wanted[key]:
            bad.append(f"{name} has shape {list(a.shape)}, '{key}' needs {list(wanted[key])}")
        elif a.dtype.kind != "f":
            bad.append(f"{name} is {a.dtype}, '{key}' needs floating-point values")
        else:
            arrays[key] = a
    if bad:
        raise WeightsError(f"shapes differ (matched by {by})", bad)
    return arrays, source


# ---------------------------------------------------------------- writing


def write_tensors(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """A .safetensors file (or, with torch installed, a .pt state_dict) of named arrays."""
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import save_file
        except ImportError:
            raise WeightsError(
                "writing .safetensors needs the safetensors package: pip install 'cnnspec[weights]'"
            ) from None

        def write(tmp):
            save_file(arrays, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    elif path.suffix in (".pt", ".pth"):
        try:
            import torch
        except ImportError:
            raise WeightsError(f"{path}: writing a PyTorch file needs torch") from None

        def write(tmp):
            torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp)
    else:
        raise WeightsError(f"{path}: give a .safetensors or .pt/.pth file name")
    replace_atomically(path, write)


def replace_atomically(path: str | os.PathLike, write) -> None:
    """write(tmp) beside `path`, then rename it over `path`: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
