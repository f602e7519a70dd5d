"""Checkpoint files: atomic writes, the random-number-generator states a bit-exact resume needs, and the
fingerprints that keep a resumed run from mixing settings or data with the run it continues."""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..data.batching import take_rows

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def save_checkpoint(path, state: dict) -> None:
    """``torch.save`` to ``path + '.tmp'`` then ``os.replace``: a kill never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunFolderError(ValueError):
    """A run folder cannot be resumed: a file in it is unreadable, or it was made with other settings or data.
    The message names the file (or the differing settings) and says what to do."""


RESUME_HINT = "rerun with --no-resume (or resume=False) to start this run over, or use a new --out folder"


def load_run_file(path, what: str, *, map_location="cpu", weights_only: bool = False):
    """``torch.load`` of a file a run wrote itself; a truncated, empty or foreign file raises
    :class:`RunFolderError` naming it instead of an unpickling traceback."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001  (pickle, zip and OS errors all mean: unreadable)
        raise RunFolderError(f"{what} {path} is unreadable ({type(err).__name__}: {err}); {RESUME_HINT}") from err


def read_run_json(path, what: str):
    """A JSON file a run wrote itself; an unreadable one raises :class:`RunFolderError` naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{what} {path} is unreadable ({type(err).__name__}: {err}); {RESUME_HINT}") from err


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (a trusted local file: it holds RNG states)."""
    state = load_run_file(path, "checkpoint", map_location=map_location)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise RunFolderError(f"checkpoint {path} is not an optembed_ext checkpoint (version {CHECKPOINT_VERSION}); "
                             f"{RESUME_HINT}")
    return state


# ------------------------------------------------------------------------------------------------ fingerprints
def _hash_array(h, a) -> None:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(str((a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())


def dataset_fingerprint(data, sample_rows: int = 4096) -> dict:
    """What identifies a dataset's splits: the feature map, the split sizes, and a hash of each split's first and
    last ``sample_rows`` rows and labels (a different split seed, row limit or preprocessing changes it)."""
    out: dict = {}
    fmap = getattr(data, "feature_map", None)
    if fmap is not None:
        out["dataset"] = str(getattr(fmap, "dataset", ""))
        out["num_fields"] = int(fmap.num_fields)
        out["num_features"] = int(fmap.num_features)
        out["cardinalities"] = hashlib.blake2b(json.dumps([int(c) for c in fmap.cardinalities]).encode(),
                                               digest_size=8).hexdigest()
    for name in ("train", "val", "test"):
        split = getattr(data, name, None)
        if split is None:
            continue
        n = len(split)
        h = hashlib.blake2b(digest_size=12)
        for part in (slice(0, min(n, sample_rows)), slice(max(0, n - sample_rows), n)):
            for a in take_rows(split, part):  # only these rows (a memory-mapped split reads nothing else)
                _hash_array(h, a)
        out[f"{name}_rows"] = int(n)
        out[f"{name}_hash"] = h.hexdigest()
    return out


def _plain(value):
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def fingerprint_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The keys (dotted for nested mappings) whose values differ between two fingerprints."""
    diff = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            diff += fingerprint_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diff.append(f"{prefix}{key}: {a!r} in the run folder, {b!r} now")
    return diff


FINGERPRINT_FILE = "fingerprint.json"


def check_fingerprint(run_dir, fingerprint: dict, *, what: str = "run") -> None:
    """Write ``run_dir/fingerprint.json`` on a fresh run; on a rerun raise :class:`RunFolderError` naming every
    setting that differs from the stored one (a folder is resumed only with the settings that made it)."""
    path = Path(run_dir) / FINGERPRINT_FILE
    current = _plain(fingerprint)
    if path.exists():
        saved = read_run_json(path, f"{what} fingerprint")
        diff = fingerprint_diff(saved, current) if isinstance(saved, dict) else ["<not a mapping>"]
        if diff:
            shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
            raise RunFolderError(f"{Path(run_dir)} holds a {what} made with other settings ({shown}); {RESUME_HINT}")
        return
    from .distributed import is_main

    if not is_main():  # rank 0 writes it (the other ranks compared it above when it existed)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def get_rng_state() -> dict:
    """States of the Python, NumPy and torch (CPU and every CUDA device) generators."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
