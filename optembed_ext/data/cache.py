"""The preprocessing cache: fingerprints of raw files, checksums of cached arrays, validation on load,
a per-folder file lock, and listing / cleaning of cache folders.

Layout of one cache folder ``<cache_dir>/<dataset>-<key>/``: ``X.npy``, ``y.npy``,
``feature_map.json``, ``vocab.json`` and ``meta.json``. ``meta.json`` holds the preprocessing
parameters, the fingerprint of every raw file read, the statistics and the checksums of the other
four files.

* **Raw-file fingerprint** (:func:`file_fingerprint`): size, modification time and a blake2b hash
  of the content -- the whole file up to :data:`FULL_HASH_BYTES`, else the first and last MiB
  and :data:`SAMPLE_BLOCKS` evenly spaced 1 MiB blocks. The cache key hashes the parameters and,
  per file, path, size and content hash (plus the mtime for a sampled hash), so an edit that keeps
  size and mtime (``cp -p``) still gets a new folder; ``touch`` alone does not rebuild small files.
* **Checksums**: blake2b of every :data:`CHECKSUM_BLOCK` bytes of ``X.npy``/``y.npy`` and of
  the whole JSON files.
* **Validation on load** (:func:`verify_cache`): the JSON checksums, the array checksums, the
  shapes, every id within its field's rows ``[offsets[f], offsets[f] + cardinalities[f])`` and
  every label in {0, 1}. Caches whose arrays hold at most :data:`FULL_VERIFY_BYTES` bytes are
  checked in full on every load; larger ones check the first, the last and a few random blocks
  (and row chunks) per load, and in full with ``full=True`` (``list_caches(root, full=True)``).
  A failed check raises :class:`~optembed_ext.data.errors.CacheError`; ``preprocess`` then logs
  ``cache <folder> is corrupt, rebuilding: <reason>`` and rebuilds it.
* **Concurrency** (:func:`cache_lock`): ``preprocess`` holds an exclusive ``fcntl.flock`` on
  ``<cache_dir>/.<dataset>-<key>.lock`` while it checks, builds or installs that folder, so
  concurrent processes build it once and the others wait and reuse it. A folder is built under
  ``.<dataset>-<key>.tmp-<pid>-<ns>.<host>`` and renamed into place (a folder being replaced is
  first renamed aside to ``.…old-…`` and removed after). Where ``flock`` is unavailable the rename
  still tolerates a concurrent winner. Temporary folders left by dead processes (``kill -9``) and
  unused lock files are removed by the next ``preprocess`` into the same cache dir
  (:func:`clean_stale_temporaries`).

:func:`list_caches` and :func:`clean_caches` back the ``optembed cache list|clean`` command.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: caches are built without a lock
    fcntl = None

from .errors import CacheError
from .types import FeatureMap

logger = logging.getLogger("optembed_ext.data")

__all__ = ["CacheEntry", "list_caches", "clean_caches", "verify_cache", "file_fingerprint", "fingerprint_key",
           "cache_lock", "clean_stale_temporaries", "CACHE_STATUSES"]

CACHE_FORMAT_VERSION = 2         # bumped whenever the encoding or the cache layout changes
FULL_HASH_BYTES = 64 << 20       # raw files up to this size are hashed in full
SAMPLE_BLOCK = 1 << 20
SAMPLE_BLOCKS = 16
CHECKSUM_BLOCK = 16 << 20        # block size of the cached-array checksums
FULL_VERIFY_BYTES = 256 << 20    # caches with at most this many array bytes are verified in full on load
_RANGE_ROWS = 1 << 16            # rows per range-check chunk
_SAMPLED_CHUNKS = 8

CACHE_FILES = ("X.npy", "y.npy", "feature_map.json", "vocab.json")
CACHE_STATUSES = ("valid", "stale", "corrupt", "building", "orphaned")
_NAME_RE = re.compile(r"^([a-z0-9]+)-([0-9a-f]{16})$")
_TEMP_RE = re.compile(r"^\.(.+)\.(tmp|old)-(\d+)-(\d+)(?:\.(.+))?$")
_LOCK_RE = re.compile(r"^\.(.+)\.lock$")


class OutdatedCacheError(CacheError):
    """A cache folder written by another version of the preprocessing (listed as ``stale``)."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def _blake(data: bytes = b"") -> "hashlib._Hash":
    return hashlib.blake2b(data, digest_size=16)


# ---------------------------------------------------------------------------------------------
# fingerprints and checksums


def file_fingerprint(path) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns", "hash", "hash_mode"}`` of a raw file (see the module doc)."""
    p = Path(path)
    st = p.stat()
    size = st.st_size
    h = _blake(str(size).encode())
    with open(p, "rb") as f:
        if size <= FULL_HASH_BYTES:
            mode = "full"
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                h.update(b)
        else:
            mode = "sampled"
            starts = {0, size - SAMPLE_BLOCK}
            step = (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS + 1)
            starts.update(step * (i + 1) for i in range(SAMPLE_BLOCKS))
            for s in sorted(starts):
                f.seek(s)
                h.update(s.to_bytes(8, "little"))
                h.update(f.read(SAMPLE_BLOCK))
    return {"path": str(p.resolve()), "size": size, "mtime_ns": st.st_mtime_ns, "hash": h.hexdigest(),
            "hash_mode": mode}


def fingerprint_key(fp: dict[str, Any]) -> list:
    """The part of a fingerprint that enters the cache key."""
    key = [fp["path"], fp["size"], fp["hash"]]
    if fp.get("hash_mode") != "full":
        key.append(fp["mtime_ns"])
    return key


def cache_key(params: dict[str, Any], fingerprints: list[dict[str, Any]]) -> str:
    """The 16 hex digits naming a cache folder: a hash of the parameters and the raw-file fingerprints."""
    files = [fingerprint_key(fp) for fp in fingerprints]
    return hashlib.sha256(json.dumps({"params": params, "files": files}, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = _blake()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _block_digests(path: Path, block: int) -> list[str]:
    out = []
    with open(path, "rb") as f:
        while True:
            b = f.read(block)
            if not b:
                break
            out.append(_blake(b).hexdigest())
    return out


def compute_checksums(folder: Path) -> dict[str, Any]:
    """Checksums of the files of a freshly written cache folder (stored in ``meta.json``)."""
    folder = Path(folder)
    out: dict[str, Any] = {}
    for name in ("X.npy", "y.npy"):
        p = folder / name
        out[name] = {"size": p.stat().st_size, "block_size": CHECKSUM_BLOCK,
                     "blocks": _block_digests(p, CHECKSUM_BLOCK)}
    for name in ("feature_map.json", "vocab.json"):
        out[name] = _file_digest(folder / name)
    return out


# ---------------------------------------------------------------------------------------------
# verification


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        raise CacheError(f"{folder}: meta.json is missing") from None
    except (OSError, ValueError) as e:
        raise CacheError(f"{folder}: meta.json is unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CacheError(f"{folder}: meta.json is not a JSON object")
    return meta


def _check_blocks(path: Path, want: dict[str, Any], full: bool, rng: random.Random) -> None:
    size = path.stat().st_size
    if size != want.get("size"):
        raise CacheError(f"{path.name} has {size} bytes, {want.get('size')} were written")
    block = int(want["block_size"])
    blocks = list(want["blocks"])
    if len(blocks) != -(-size // block):
        raise CacheError(f"{path.name}: checksum list does not match the file size")
    idx = range(len(blocks)) if full else sorted({0, len(blocks) - 1} | set(
        rng.sample(range(len(blocks)), min(_SAMPLED_CHUNKS, len(blocks)))))
    with open(path, "rb") as f:
        for i in idx:
            f.seek(i * block)
            if _blake(f.read(block)).hexdigest() != blocks[i]:
                raise CacheError(f"{path.name}: bytes {i * block}..{min(size, (i + 1) * block)} changed since "
                                 "the cache was written (checksum mismatch)")


class _RowReader:
    """Rows of a memory-mapped ``.npy`` array read with plain file reads: the checks leave what they read in the page
    cache, not in the process's mapping (its resident set), so a process that then reads a part of the array holds
    only that part."""

    def __init__(self, path: Path, arr: np.ndarray):
        self.arr = arr
        plain = isinstance(arr, np.memmap) and arr.flags.c_contiguous and arr.ndim in (1, 2)
        self.f = open(path, "rb") if plain else None
        self.row = arr.dtype.itemsize * (arr.shape[1] if arr.ndim == 2 else 1)

    def __getitem__(self, rows: slice) -> np.ndarray:
        if self.f is None:
            return np.asarray(self.arr[rows])
        a, b = rows.start, rows.stop
        self.f.seek(self.arr.offset + a * self.row)
        out = np.frombuffer(self.f.read((b - a) * self.row), dtype=self.arr.dtype)
        return out.reshape((b - a,) + self.arr.shape[1:])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _check_ranges(X, y, fmap: FeatureMap, full: bool, rng: random.Random) -> None:
    n = X.arr.shape[0] if isinstance(X, _RowReader) else X.shape[0]
    lo = np.asarray(fmap.offsets, dtype=np.int64)
    hi = lo + np.asarray(fmap.cardinalities, dtype=np.int64)
    starts = list(range(0, n, _RANGE_ROWS))
    if not full and len(starts) > _SAMPLED_CHUNKS + 2:
        starts = sorted({starts[0], starts[-1]} | set(rng.sample(starts, _SAMPLED_CHUNKS)))
    for a in starts:
        b = min(n, a + _RANGE_ROWS)
        blk = np.asarray(X[a:b])
        bad = (blk < lo) | (blk >= hi)
        if bad.any():
            r, c = (int(v) for v in np.argwhere(bad)[0])
            raise CacheError(f"X.npy row {a + r}, field {c} ({fmap.field_names[c]}) holds id {int(blk[r, c])}, "
                             f"outside the field's rows [{int(lo[c])}, {int(hi[c])})")
        yb = np.asarray(y[a:b])
        bady = (yb != 0) & (yb != 1)
        if bady.any():
            r = int(np.flatnonzero(bady)[0])
            raise CacheError(f"y.npy row {a + r} holds label {float(yb[r])!r}, not 0 or 1")


def verify_cache(folder, *, full: bool | None = None, format_version: int | None = CACHE_FORMAT_VERSION):
    """Check a cache folder; return ``(feature_map, meta, X, y)`` (arrays memory-mapped read-only).

    ``full=None``: full checks when the arrays hold at most :data:`FULL_VERIFY_BYTES` bytes, else
    sampled ones. Raises :class:`CacheError` naming what is wrong.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CacheError(f"{folder} is not a cache folder")
    meta = _read_meta(folder)
    params = meta.get("params")
    if not isinstance(params, dict):
        raise CacheError(f"{folder}: meta.json holds no preprocessing parameters")
    version = params.get("format_version")
    if format_version is not None and isinstance(version, int) and version != format_version:
        raise OutdatedCacheError(f"{folder} was written by another version of the preprocessing "
                                 f"(format {params.get('format_version')}, expected {format_version})")
    name = _NAME_RE.match(folder.name)
    if name is not None:
        try:
            key = cache_key(params, meta.get("files"))
        except (TypeError, KeyError, ValueError):
            key = None
        if key != name.group(2):
            raise CacheError(f"{folder}: meta.json parameters or raw-file fingerprints do not match the folder "
                             "name (meta.json was changed)")
    if format_version is not None and version != format_version:
        raise CacheError(f"{folder}: meta.json holds format version {version!r}, expected {format_version}")
    sums = meta.get("checksums")
    if not isinstance(sums, dict):
        raise OutdatedCacheError(f"{folder}: meta.json holds no checksums (written by an older version)")
    if any(k not in sums for k in CACHE_FILES):
        raise CacheError(f"{folder}: meta.json lacks the checksums of {[k for k in CACHE_FILES if k not in sums]}")
    try:
        nbytes = sum(int(sums[k]["size"]) for k in ("X.npy", "y.npy"))
        if full is None:
            full = nbytes <= FULL_VERIFY_BYTES
        for name in ("feature_map.json", "vocab.json"):
            if name == "vocab.json" and not full and (folder / name).stat().st_size > FULL_VERIFY_BYTES:
                continue  # a huge vocabulary is checked by load_vocab when it is read
            if _file_digest(folder / name) != sums[name]:
                raise CacheError(f"{name} changed since the cache was written (checksum mismatch)")
        fmap = FeatureMap.from_json(folder / "feature_map.json")
        rng = random.Random(time.time_ns())
        for name in ("X.npy", "y.npy"):
            _check_blocks(folder / name, sums[name], full, rng)
        X = np.load(folder / "X.npy", mmap_mode="r")
        y = np.load(folder / "y.npy", mmap_mode="r")
        if X.ndim != 2 or X.shape[1] != fmap.num_fields or y.shape != (X.shape[0],):
            raise CacheError(f"array shapes X {X.shape}, y {y.shape} do not match feature_map.json "
                             f"({fmap.num_fields} fields)")
        if not np.issubdtype(X.dtype, np.integer) or y.dtype != np.float32:
            raise CacheError(f"array dtypes X {X.dtype}, y {y.dtype} are not integer / float32")
        rows = meta.get("rows")
        if rows is not None and rows != X.shape[0]:
            raise CacheError(f"X.npy has {X.shape[0]} rows, meta.json says {rows}")
        readers = (_RowReader(folder / "X.npy", X), _RowReader(folder / "y.npy", y))
        try:
            _check_ranges(*readers, fmap, full, rng)
        finally:
            for r in readers:
                r.close()
    except CacheError as e:
        if str(e).startswith(str(folder)):
            raise
        raise CacheError(f"{folder}: {e}") from None
    except Exception as e:  # any other failure to read the files: the folder is corrupt
        raise CacheError(f"{folder}: {type(e).__name__}: {e}") from None
    return fmap, meta, X, y


# ---------------------------------------------------------------------------------------------
# locking and temporary folders


def _try_lock(fd: int, blocking: bool) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def cache_lock(lock_path, *, blocking: bool = True, wait_message: str | None = None):
    """Hold an exclusive ``flock`` on ``lock_path`` (created, and removed on release).

    Yields ``True`` while the lock is held; ``False`` when ``blocking=False`` and another process
    holds it, or where file locks are unsupported (then the caller proceeds without one). Safe with
    the removal on release: after acquiring, the lock is retried if the path no longer names the
    locked file.
    """
    if fcntl is None:  # pragma: no cover - not POSIX
        yield False
        return
    lock_path = Path(lock_path)
    fd = None
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            logger.warning("cannot create the lock file %s (%s); continuing without a lock", lock_path, e)
            fd = None
            break
        try:
            got = _try_lock(fd, False)
            if not got and blocking:
                if wait_message:
                    logger.info("%s", wait_message)
                got = _try_lock(fd, True)
        except OSError as e:  # e.g. ENOLCK on a network file system
            logger.warning("cannot lock %s (%s); continuing without a lock", lock_path, e)
            os.close(fd)
            fd = None
            break
        if not got:
            os.close(fd)
            yield False
            return
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed the file: lock the current one
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def temp_name(label: str, kind: str = "tmp") -> str:
    return f".{label}.{kind}-{os.getpid()}-{time.time_ns()}.{_host()}"


def _temp_owner_alive(m: re.Match) -> bool:
    host = m.group(5)
    if host is not None and host != _host():
        return True  # another machine's process: cannot tell, leave it
    return _pid_alive(int(m.group(3)))


def _remove_tree(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        logger.warning("cannot remove %s: %s", path, e)
        return False


def clean_stale_temporaries(cache_dir, *, temporaries: bool = True, locks: bool = True) -> list[Path]:
    """Remove temporary / replaced folders of dead processes and unused lock files in ``cache_dir``."""
    cache_dir = Path(cache_dir)
    removed = []
    try:
        entries = list(cache_dir.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP_RE.match(p.name)
        if m is not None:
            if temporaries and not _temp_owner_alive(m) and _remove_tree(p):
                logger.info("removed the temporary folder %s of a dead process", p)
                removed.append(p)
            continue
        if locks and _LOCK_RE.match(p.name) and p.is_file():
            with cache_lock(p, blocking=False) as held:
                if held:
                    removed.append(p)  # unlinked on release
    return removed


def install_folder(tmp: Path, final: Path, replace: bool = True) -> bool:
    """Rename the complete folder ``tmp`` to ``final``.

    ``replace=True``: a previous ``final`` (corrupt, or rebuilt on purpose) is renamed aside and
    removed. ``replace=False``: a ``final`` that exists already -- installed by a concurrent process,
    which only happens without a lock -- wins. Returns ``False`` (and removes ``tmp``) when another
    process's folder was kept.
    """
    old = None
    if replace and final.exists():
        old = final.parent / temp_name(final.name, "old")
        try:
            os.rename(final, old)
        except FileNotFoundError:
            old = None
    try:
        os.rename(tmp, final)
        won = True
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        won = False
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return won


# ---------------------------------------------------------------------------------------------
# listing and cleaning


@dataclass
class CacheEntry:
    """One folder of a cache dir, as listed by :func:`list_caches`.

    ``status``: ``valid`` (passes the checks, raw files unchanged), ``stale`` (valid, but a raw file
    it was built from is gone or changed), ``corrupt`` (fails the checks: ``reason`` says why),
    ``building`` (a temporary folder of a live process), ``orphaned`` (a temporary folder of a dead
    process).
    """

    path: Path
    dataset: str | None
    status: str
    reason: str = ""
    size_bytes: int = 0
    rows: int | None = None
    created: str | None = None
    files: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _tree_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _stale_reason(meta: dict[str, Any]) -> str:
    for fp in meta.get("files", []):
        p = Path(fp.get("path", ""))
        if not p.is_file():
            return f"raw file {p} is gone"
        try:
            now = file_fingerprint(p)
        except OSError as e:
            return f"raw file {p} is unreadable ({e})"
        if now["size"] != fp.get("size") or now["hash"] != fp.get("hash") or (
                now["hash_mode"] != "full" and now["mtime_ns"] != fp.get("mtime_ns")):
            return f"raw file {p} changed since the cache was built"
    return ""


def _entry(p: Path, full: bool | None) -> CacheEntry | None:
    m = _TEMP_RE.match(p.name)
    if m is not None:
        label = m.group(1)
        ds = _NAME_RE.match(label)
        status = "building" if m.group(2) == "tmp" and _temp_owner_alive(m) else "orphaned"
        if m.group(2) == "old" and _temp_owner_alive(m):
            status = "building"  # being replaced right now
        return CacheEntry(p, ds.group(1) if ds else None, status,
                          f"temporary folder of process {m.group(3)}", _tree_size(p))
    if p.name.startswith(".") or not p.is_dir():
        return None
    ds = _NAME_RE.match(p.name)
    if ds is None and not (p / "meta.json").exists():
        return None
    dataset = ds.group(1) if ds else None
    size = _tree_size(p)
    try:
        fmap, meta, X, _ = verify_cache(p, full=full)
    except CacheError as e:
        reason = str(e)
        if reason.startswith(f"{p}: "):
            reason = reason[len(str(p)) + 2:]
        return CacheEntry(p, dataset, "stale" if isinstance(e, OutdatedCacheError) else "corrupt", reason, size)
    params = meta["params"]
    try:
        files = [str(fp["path"]) for fp in meta.get("files", [])]
        stale = _stale_reason(meta)
    except (TypeError, KeyError, AttributeError) as e:
        return CacheEntry(p, dataset, "corrupt", f"meta.json lists no readable raw files ({e})", size)
    entry = CacheEntry(p, params.get("dataset", dataset), "valid", "", size, int(X.shape[0]),
                       meta.get("created"), files, params)
    del X
    if stale:
        entry.status, entry.reason = "stale", stale
    return entry


def list_caches(root, *, full: bool | None = None) -> list[CacheEntry]:
    """Every cache folder (and temporary folder) directly under ``root``, sorted by path.

    ``full``: verify every block (True), sampled blocks (False), or by size (None, the default --
    see :func:`verify_cache`). A missing ``root`` lists nothing.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        e = _entry(p, full)
        if e is not None:
            out.append(e)
    return out


def clean_caches(root, *, statuses=("stale", "corrupt", "orphaned"), datasets=None, dry_run: bool = False,
                 full: bool | None = None) -> list[CacheEntry]:
    """Remove the cache folders under ``root`` whose status is in ``statuses`` (``"all"`` for every
    status but ``building``) and, when given, whose dataset is in ``datasets``. Folders in use by
    another process (its lock is held) are skipped. Returns the entries removed (or that would be,
    with ``dry_run``). Also removes unused lock files.
    """
    root = Path(root).expanduser()
    if statuses == "all":
        statuses = ("valid", "stale", "corrupt", "orphaned")
    elif isinstance(statuses, str):
        statuses = (statuses,)
    statuses = set(statuses)
    bad = statuses - set(CACHE_STATUSES)
    if bad:
        raise ValueError(f"unknown cache statuses {sorted(bad)}; expected some of {list(CACHE_STATUSES)}")
    statuses.discard("building")
    if datasets is not None:
        datasets = {datasets} if isinstance(datasets, str) else set(datasets)
    removed = []
    for e in list_caches(root, full=full):
        if e.status not in statuses or (datasets is not None and e.dataset not in datasets):
            continue
        if dry_run:
            removed.append(e)
            continue
        if e.status == "orphaned":
            if _remove_tree(e.path):
                removed.append(e)
            continue
        with cache_lock(root / f".{e.path.name}.lock", blocking=False) as held:
            if not held and _lock_supported():
                logger.info("skipping %s: in use by another process", e.path)
                continue
            aside = root / temp_name(e.path.name, "old")
            try:
                os.rename(e.path, aside)
            except FileNotFoundError:
                continue
            if _remove_tree(aside):
                removed.append(e)
    if not dry_run and root.is_dir():
        clean_stale_temporaries(root, temporaries="orphaned" in statuses)
    return removed


def _lock_supported() -> bool:
    return fcntl is not None
