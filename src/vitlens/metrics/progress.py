"""Resuming an interrupted evaluation: its state at a batch boundary, in plain JSON beside ``--out``.

``vitlens evaluate --out FILE`` writes ``.FILE.partial<rank>.json`` atomically every ``checkpoint_every_s``
seconds: the run's settings, how many batches are done, the counters and every metric's state (its sums,
per-image records and the other values it keeps). ``--resume`` checks the settings are the same, restores the
state and continues with the next batch; a finished run removes the file. Tensors and arrays are stored as
typed lists, so nothing in the file is ever executed (no pickle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import VitlensError
from ..io import atomic_write_json


def partial_path(out: str | os.PathLike, rank: int) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.partial{rank}.json")


def encode(value: object) -> object:
    """A JSON form of tensors, arrays, lists, dicts and plain values; ``TypeError`` for anything else."""
    if torch.is_tensor(value):
        t = value.detach().cpu()
        return {"tensor": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.reshape(-1).tolist()}
    if isinstance(value, np.ndarray):
        return {"array": value.dtype.str, "shape": list(value.shape), "data": value.reshape(-1).tolist()}
    if isinstance(value, list | tuple):
        return {"list": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {str(k): encode(v) for k, v in value.items()}}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(type(value).__name__)


DTYPES = {"float64": torch.float64, "float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


def decode(value: object, where: str) -> object:
    """The inverse of :func:`encode`; a one-line error for anything it does not write."""
    if not isinstance(value, dict) or len(value) not in (1, 3):
        raise VitlensError(f"{where}: not a vitlens evaluation state")
    try:
        if "tensor" in value:
            dtype = DTYPES[value["tensor"]]
            return torch.tensor(value["data"], dtype=dtype).reshape(value["shape"])
        if "array" in value:
            return np.asarray(value["data"], dtype=np.dtype(value["array"])).reshape(value["shape"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise VitlensError(f"{where}: not a vitlens evaluation state ({type(e).__name__})") from None
    if "list" in value and isinstance(value["list"], list):
        return [decode(v, where) for v in value["list"]]
    if "dict" in value and isinstance(value["dict"], dict):
        return {k: decode(v, where) for k, v in value["dict"].items()}
    if "value" in value and (value["value"] is None or isinstance(value["value"], bool | int | float | str)):
        return value["value"]
    raise VitlensError(f"{where}: not a vitlens evaluation state")


def metric_state(metric) -> dict:
    """What a metric has accumulated: every attribute :func:`encode` can write (settings excluded)."""
    state = {}
    for key, value in vars(metric).items():
        if key == "settings":
            continue
        try:
            state[key] = encode(value)
        except TypeError:  # references set up from the model or the data set: ``setup`` makes them again
            continue
    return state


def save(out: str | os.PathLike, rank: int, signature: dict, done: int, run: dict, metrics: dict) -> None:
    """Write the state after ``done`` batches (atomically)."""
    payload = {
        "format": "vitlens-evaluation-state",
        "signature": signature,
        "done": done,
        "run": {k: encode(v) for k, v in run.items()},
        "metrics": {method: {name: metric_state(m) for name, m in per.items()} for method, per in metrics.items()},
    }
    atomic_write_json(partial_path(out, rank), payload)


def load(out: str | os.PathLike, rank: int, signature: dict) -> tuple[int, dict, dict]:
    """``(batches done, run counters, metric states)`` of the interrupted run writing ``out``, checked."""
    path = partial_path(out, rank)
    if not path.is_file():
        raise VitlensError(f"--resume: no interrupted evaluation writing {out} (no {path.name})")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitlensError(f"{path}: not a vitlens evaluation state ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != "vitlens-evaluation-state":
        raise VitlensError(f"{path}: not a vitlens evaluation state")
    recorded = payload.get("signature")
    if recorded != signature:
        changed = sorted(k for k in signature if not isinstance(recorded, dict) or recorded.get(k) != signature[k])
        raise VitlensError(f"--resume: settings differ from the interrupted run ({', '.join(changed)}); "
                           "repeat its command with --resume")  # fmt: skip
    done = payload.get("done")
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        raise VitlensError(f"{path}: not a vitlens evaluation state (bad 'done')")
    run = payload.get("run")
    metrics = payload.get("metrics")
    if not isinstance(run, dict) or not isinstance(metrics, dict):
        raise VitlensError(f"{path}: not a vitlens evaluation state")
    return done, {k: decode(v, str(path)) for k, v in run.items()}, metrics


def restore(metric, state: object, where: str) -> None:
    """Put a saved state back into a freshly set-up metric."""
    if not isinstance(state, dict):
        raise VitlensError(f"{where}: not a vitlens evaluation state")
    for key, value in state.items():
        if not key.isidentifier() or key.startswith("__") or key == "settings" or hasattr(type(metric), key):
            raise VitlensError(f"{where}: unknown state {key!r} for metric {metric.name}")
        decoded = decode(value, where)
        if not fits(decoded, getattr(metric, key, None)) or not base_state_fits(key, decoded):
            raise VitlensError(f"{where}: state {key!r} of metric {metric.name} does not fit this run")
        setattr(metric, key, decoded)


def base_state_fits(key: str, value: object) -> bool:
    """The base :class:`~vitlens.metrics.base.Metric` state: float64 sums, int64 index parts, array records."""
    if key == "sums":
        return all(torch.is_tensor(v) and v.dtype == torch.float64 for v in value.values())
    if key == "_index":
        return all(isinstance(v, np.ndarray) and v.dtype == np.int64 and v.ndim == 1 for v in value)
    if key == "_records":
        return all(isinstance(v, list) and all(isinstance(a, np.ndarray) for a in v) for v in value.values())
    return True


def fits(saved: object, current: object) -> bool:
    """Whether a saved value has the form of the freshly set-up one (same types, tensors of the same shape
    and dtype; sums may hold keys set up later). ``current`` ``None``: a value the metric sets while it runs."""
    if current is None:
        return True
    if torch.is_tensor(current):
        return torch.is_tensor(saved) and saved.dtype == current.dtype and saved.shape == current.shape
    if isinstance(current, np.ndarray):
        return isinstance(saved, np.ndarray) and saved.dtype == current.dtype
    if isinstance(current, dict):
        return (
            isinstance(saved, dict)
            and all(fits(saved[k], v) for k, v in current.items() if k in saved)
            and all(
                type(v) in (torch.Tensor, np.ndarray, list) or v is None or isinstance(v, int | float | str)
                for v in saved.values()
            )
        )
    if isinstance(current, list | tuple):
        return (
            isinstance(saved, list) and all(fits(v, current[0]) for v in saved) if current else isinstance(saved, list)
        )
    return type(saved) is type(current) or (isinstance(current, float) and isinstance(saved, int | float))


def remove(out: str | os.PathLike, rank: int) -> None:
    partial_path(out, rank).unlink(missing_ok=True)
