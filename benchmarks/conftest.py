"""Shared benchmark machinery: shapes, id distributions, devices, timing records and the session summary.

Every benchmark case is parametrised over an implementation (``impl``); the baseline implementation of a case
(``reference`` = :mod:`optembed_ext.reference`, or ``fbgemm``) is listed first, so it runs first and each following
implementation's line can print its ratio to the baseline measured in the same session. At the end of the session
a table of all cases (median times, ratio, achieved GB/s, target check) is printed, and written as JSON with
``--optembed-json PATH``.

Environment variables (all optional):

``OPTEMBED_BENCH_SHAPES``  comma-separated shape names to run (default ``small,criteo``; ``criteo1e7`` also needs
                           ``OPTEMBED_BENCH_LARGE=1``)
``OPTEMBED_BENCH_LARGE``   ``1`` enables the N = 1e7 Criteo shape (about 2.6 GB per float32 table, plus a dense
                           gradient and two Adam moments for the reference: budget ~12 GB of memory)
``OPTEMBED_BENCH_DISTS``   comma-separated id distributions (default ``zipf,uniform``)
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

# ============================================================================================== configuration
ZIPF_ALPHA = 1.05


@dataclass(frozen=True)
class Shape:
    """One table/batch configuration: ``batch`` samples of ``fields`` ids into an ``(rows, dim)`` table."""

    name: str
    batch: int
    fields: int
    dim: int
    rows: int

    @property
    def lookups(self) -> int:
        return self.batch * self.fields

    def cardinalities(self) -> list[int]:
        """Rows per field: ``rows`` split as evenly as possible over the fields (field f owns a contiguous block)."""
        base, extra = divmod(self.rows, self.fields)
        return [base + (1 if f < extra else 0) for f in range(self.fields)]

    def offsets(self) -> list[int]:
        out, acc = [], 0
        for c in self.cardinalities():
            out.append(acc)
            acc += c
        return out

    def field_of_row(self, device=None) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.fields), torch.tensor(self.cardinalities())).to(device)

    def __str__(self) -> str:
        return f"B={self.batch} F={self.fields} D={self.dim} N={self.rows:.0e}".replace("e+0", "e")


SHAPES = {
    "small": Shape("small", batch=256, fields=8, dim=16, rows=10_000),
    "criteo": Shape("criteo", batch=2048, fields=39, dim=64, rows=1_000_000),
    "criteo1e7": Shape("criteo1e7", batch=2048, fields=39, dim=64, rows=10_000_000),
}
LARGE_SHAPES = {"criteo1e7"}
DEFAULT_SHAPES = ("small", "criteo")
DISTS = ("zipf", "uniform")


def _env_list(name: str, default) -> list[str]:
    raw = os.environ.get(name, "").strip()
    return [s.strip() for s in raw.split(",") if s.strip()] if raw else list(default)


def large_enabled() -> bool:
    return os.environ.get("OPTEMBED_BENCH_LARGE", "").strip().lower() in {"1", "true", "yes", "on"}


def shape_params(names=None) -> list:
    """pytest params of the selected shapes (``names`` restricts them further, e.g. to shapes a suite supports)."""
    selected = _env_list("OPTEMBED_BENCH_SHAPES", DEFAULT_SHAPES)
    unknown = [s for s in selected if s not in SHAPES]
    if unknown:
        raise ValueError(f"OPTEMBED_BENCH_SHAPES: unknown shape(s) {unknown}; known: {sorted(SHAPES)}")
    if large_enabled() and "criteo1e7" not in selected:
        selected.append("criteo1e7")
    params = []
    for s in selected:
        if names is not None and s not in names:
            continue
        marks = ()
        if s in LARGE_SHAPES and not large_enabled():
            marks = pytest.mark.skip(reason=f"shape {s} needs OPTEMBED_BENCH_LARGE=1 (memory)")
        params.append(pytest.param(SHAPES[s], id=s, marks=marks))
    return params


def dist_params() -> list:
    selected = _env_list("OPTEMBED_BENCH_DISTS", DISTS)
    unknown = [d for d in selected if d not in DISTS]
    if unknown:
        raise ValueError(f"OPTEMBED_BENCH_DISTS: unknown distribution(s) {unknown}; known: {list(DISTS)}")
    return [pytest.param(d, id=d) for d in selected]


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present")),
]


# ================================================================================================ input data
_IDS_CACHE: dict = {}


def make_ids(shape: Shape, dist: str, device="cpu", seed: int = 0) -> torch.Tensor:
    """``(B, F)`` int64 global ids; column f draws from field f's block of ``shape.cardinalities()[f]`` rows.

    ``zipf``: rank k of a field has probability proportional to ``k ** -1.05`` (a few very hot rows, a long tail),
    ranks are mapped to rows by a fixed random permutation so hot rows are scattered over the table.
    ``uniform``: every row of the field equally likely.
    """
    key = (shape, dist, seed)
    if key not in _IDS_CACHE:
        if dist not in DISTS:
            raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
        rng = np.random.default_rng(seed)
        cols = []
        for card, off in zip(shape.cardinalities(), shape.offsets()):
            if dist == "uniform":
                local = rng.integers(0, card, size=shape.batch)
            else:
                p = np.arange(1, card + 1, dtype=np.float64) ** -ZIPF_ALPHA
                p /= p.sum()
                ranks = rng.choice(card, size=shape.batch, p=p)
                local = rng.permutation(card)[ranks]
            cols.append(local + off)
        _IDS_CACHE[key] = torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))
    return _IDS_CACHE[key].to(device)


#: standard deviation of the benchmark tables; thresholds are set at the mean L1 row norm so about half of the
#: looked-up rows are pruned (both branches of the mask are exercised)
WEIGHT_STD = 0.01


def make_table(shape: Shape, device="cpu", dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape.rows, shape.dim, generator=g, dtype=torch.float32).mul_(WEIGHT_STD)
    return w.to(device=device, dtype=dtype)


def make_threshold(shape: Shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    mean_l1 = shape.dim * WEIGHT_STD * math.sqrt(2.0 / math.pi)
    return torch.full((shape.fields,), mean_l1, dtype=dtype, device=device)


def make_dims(shape: Shape, device="cpu", seed: int = 0) -> torch.Tensor:
    """Per-sample kept dimensions (B, F) drawn uniformly from 1..D, as the OptEmbed supernet samples them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, shape.dim + 1, (shape.batch, shape.fields), generator=g).to(device)


def unique_rows(ids: torch.Tensor) -> int:
    return int(torch.unique(ids).numel())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Correctness gate run before timing (float32 tolerances unless the dtype is wider)."""
    if actual.layout != torch.strided:
        actual = actual.to_dense()
    if expected.layout != torch.strided:
        expected = expected.to_dense()
    tol = {"rtol": 1e-4, "atol": 1e-5} if actual.dtype in (torch.float32, torch.float64) else {}
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: fused result differs from reference\n{m}",
                               **tol)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# =================================================================================================== records
@dataclass
class Record:
    suite: str
    case: str
    device: str
    impl: str
    baseline: str
    median_s: float | None
    rounds: int
    nbytes: int | None
    items: int | None
    item_name: str | None
    target: float | None  # minimum speedup of this impl over the baseline (None = no target)
    target_note: str | None

    @property
    def gbps(self) -> float | None:
        if self.nbytes is None or not self.median_s:
            return None
        return self.nbytes / self.median_s / 1e9


def _fmt_ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:.3f}"


def _rate(rec: Record) -> str:
    """Achieved GB/s, or the item throughput for cases without a byte count."""
    if rec.gbps is not None:
        return f"{rec.gbps:.2f} GB/s"
    if rec.items and rec.median_s:
        return f"{rec.items / rec.median_s:,.0f} {rec.item_name or 'items'}/s"
    return "-"


class Recorder:
    """Session-wide store of the benchmark records, registered as a pytest plugin (so every benchmark module and the
    summary hook share one store however this conftest was imported)."""

    NAME = "optembed-bench-recorder"

    def __init__(self):
        self.records: list[Record] = []

    def find(self, suite, case, device, impl) -> Record | None:
        for r in reversed(self.records):
            if (r.suite, r.case, r.device, r.impl) == (suite, case, device, impl):
                return r
        return None

    def ratio(self, rec: Record) -> float | None:
        """Speedup of ``rec`` over its baseline (baseline time / rec time)."""
        if rec.impl == rec.baseline:
            return None
        base = self.find(rec.suite, rec.case, rec.device, rec.baseline)
        if base is None or not base.median_s or not rec.median_s:
            return None
        return base.median_s / rec.median_s

    def target_status(self, rec: Record) -> str:
        if rec.target is None:
            return ""
        r = self.ratio(rec)
        base = self.find(rec.suite, rec.case, rec.device, rec.baseline)
        if r is None or rec.rounds < 2 or base is None or base.rounds < 2:
            return "n/a"  # no baseline, or a single untimed-quality call (--benchmark-disable)
        note = f", {rec.target_note}" if rec.target_note else ""
        return ("PASS" if r >= rec.target else "MISS") + f" (>= x{rec.target:.2f}{note})"

    def line(self, rec: Record) -> str:
        parts = [f"{rec.impl}: {_fmt_ms(rec.median_s)} ms"]
        if rec.gbps is not None:
            parts.append(f"{rec.gbps:.2f} GB/s")
        if rec.items and rec.median_s:
            parts.append(f"{rec.items / rec.median_s:,.0f} {rec.item_name or 'items'}/s")
        base = self.find(rec.suite, rec.case, rec.device, rec.baseline) if rec.impl != rec.baseline else None
        if base is not None:
            parts.append(f"{rec.baseline}: {_fmt_ms(base.median_s)} ms")
            r = self.ratio(rec)
            if r is not None:
                parts.append(f"speedup x{r:.2f}")
        status = self.target_status(rec)
        if status:
            parts.append(f"target {status}")
        return ", ".join(parts)

    def rows(self) -> list[tuple]:
        out = []
        for rec in self.records:
            if rec.impl == rec.baseline and any(
                    (r.suite, r.case, r.device) == (rec.suite, rec.case, rec.device) and r.impl != r.baseline
                    for r in self.records):
                continue  # the baseline is shown next to every other implementation of its case
            base = self.find(rec.suite, rec.case, rec.device, rec.baseline)
            r = self.ratio(rec)
            out.append((rec.suite, rec.case, rec.device, rec.baseline, _fmt_ms(base.median_s) if base else "-",
                        rec.impl, _fmt_ms(rec.median_s), "-" if r is None else f"x{r:.2f}", _rate(rec),
                        "-" if base is None else _rate(base), self.target_status(rec)))
        return out

    def markdown(self, config) -> str:
        """The summary as Markdown: a machine/command header, then one table per suite (for RESULTS.md)."""
        info = machine_info()
        args = shlex.join(str(a) for a in config.invocation_params.args)
        env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in sorted(os.environ)
                       if k.startswith("OPTEMBED_BENCH_") or k in ("OMP_NUM_THREADS", "GLIBC_TUNABLES"))
        lines = [f"- date: {info['date_utc']}; commit: {info['commit']}",
                 f"- command: `{(env + ' ') if env else ''}pytest {args}`",
                 f"- CPU: {info['cpu']} ({info['cpu_count']} logical CPUs, torch threads {info['torch_threads']}); "
                 f"GPU: {info['cuda_device'] or 'none'}",
                 f"- torch {info['torch']}; extension built: {info['has_extension']}; fbgemm_gpu: {info['fbgemm_gpu']}",
                 ""]
        suites: dict[str, list[tuple]] = {}
        for row in self.rows():
            suites.setdefault(row[0], []).append(row[1:])
        header = ("case", "device", "baseline", "baseline ms", "impl", "impl ms", "speedup", "impl rate",
                  "baseline rate", "target")
        for suite, rows in suites.items():
            lines += [f"### {suite}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
            lines.append("")
        return "\n".join(lines)

    # pytest hook (the recorder is a registered plugin)
    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not self.records:
            return
        tr = terminalreporter
        tr.section("optembed benchmark summary (median; speedup = baseline time / impl time)")
        header = ("suite", "case", "dev", "baseline", "base ms", "impl", "impl ms", "speedup", "impl rate",
                  "base rate", "target")
        rows = self.rows()
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        for line in [header, tuple("-" * w for w in widths), *rows]:
            tr.write_line("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
        missed = [r for r in self.records if self.target_status(r).startswith("MISS")]
        if missed:
            tr.write_line(f"{len(missed)} case(s) missed their target (timings on a busy machine are indicative).")
        md_path = config.getoption("--optembed-md", default=None)
        if md_path:
            Path(md_path).write_text(self.markdown(config))
            tr.write_line(f"optembed benchmark summary written to {md_path}")
        path = config.getoption("--optembed-json", default=None)
        if path:
            out = {"machine": machine_info(),
                   "records": [dict(asdict(r), gbps=r.gbps, speedup=self.ratio(r),
                                    target_status=self.target_status(r)) for r in self.records]}
            Path(path).write_text(json.dumps(out, indent=2))
            tr.write_line(f"optembed benchmark summary written to {path}")


def recorder(config) -> Recorder:
    rec = config.pluginmanager.get_plugin(Recorder.NAME)
    if rec is None:
        rec = Recorder()
        config.pluginmanager.register(rec, Recorder.NAME)
    return rec


def run_case(benchmark, request, fn, *, suite: str, case: str, device, impl: str, baseline: str = "reference",
             nbytes: int | None = None, items: int | None = None, item_name: str | None = None,
             target: float | None = None, target_note: str | None = None) -> Record:
    """Time ``fn`` with pytest-benchmark (device synchronised after every call), record and print the result.

    ``nbytes`` = bytes the operation must move (the same count for every implementation of a case, so the GB/s of
    two implementations compare like their times); ``items`` (with ``item_name``, e.g. samples) gives a throughput
    instead. ``target`` = minimum speedup of ``impl`` over ``baseline`` (checked in the summary, never fails a test:
    timings on a shared machine are noisy). The baseline of a case must run before the other implementations
    (list it first in the ``impl`` parametrisation) for the per-case line to show the ratio; the summary table
    pairs them regardless of order.
    """
    device = str(device)

    def timed():
        out = fn()
        synchronize(device)
        return out

    benchmark.group = f"{suite}: {case} [{device}]"
    benchmark.extra_info.update(suite=suite, case=case, device=device, impl=impl, baseline=baseline,
                                nbytes=nbytes, items=items)
    t0 = time.perf_counter()
    benchmark(timed)
    single = time.perf_counter() - t0
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median, rounds = stats.stats.median, stats.stats.rounds
    else:  # --benchmark-disable: one call, timed here (indicative only)
        median, rounds = single, 1
    rec = Record(suite, case, device, impl, baseline, median, rounds, nbytes, items, item_name, target, target_note)
    store = recorder(request.config)
    store.records.append(rec)
    benchmark.extra_info["median_s"] = median
    _print_now(request.config, f"[{suite}] {case} [{device}] {store.line(rec)}")
    return rec


def _print_now(config, text: str) -> None:
    """Write a line to the terminal right away, even while pytest captures the test's output."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return
    capman = config.pluginmanager.get_plugin("capturemanager")
    if capman is None:
        tr.ensure_newline()
        tr.write_line(text)
        return
    with capman.global_and_fixture_disabled():
        tr.ensure_newline()
        tr.write_line(text)


# ============================================================================================== pytest hooks
def pytest_addoption(parser):
    parser.addoption("--optembed-json", default=None, metavar="PATH",
                     help="write the optembed benchmark summary (all cases, ratios, GB/s, machine) as JSON")
    parser.addoption("--optembed-md", default=None, metavar="PATH",
                     help="write the optembed benchmark summary as Markdown tables (for benchmarks/RESULTS.md)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped where none is present)")
    config.addinivalue_line("markers", "slow: slow benchmark")
    recorder(config)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
        if fields.get("Model name"):
            extra = ", ".join(f"{k.lower()} {fields[k]}" for k in ("CPU family", "Model") if fields.get(k))
            virt = f", {fields['Hypervisor vendor']} guest" if fields.get("Hypervisor vendor") else ""
            return f"{fields['Model name']} ({extra}{virt})"
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=here)
        commit = out.stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
        return commit + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    from optembed_ext import _ext

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "has_extension": _ext.HAS_EXTENSION,
        "commit": git_commit(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        import fbgemm_gpu  # noqa: F401

        info["fbgemm_gpu"] = getattr(fbgemm_gpu, "__version__", "installed")
    except Exception:  # noqa: BLE001 - optional dependency: any import failure means "absent"
        info["fbgemm_gpu"] = None
    return info


def pytest_report_header(config):
    info = machine_info()
    return [f"optembed bench: cpu={info['cpu']} ({info['cpu_count']} cpus, torch threads {info['torch_threads']}), "
            f"cuda={info['cuda_device']}, torch {info['torch']}, extension={info['has_extension']}, "
            f"fbgemm_gpu={info['fbgemm_gpu']}, commit={info['commit']}",
            f"optembed bench: shapes={_env_list('OPTEMBED_BENCH_SHAPES', DEFAULT_SHAPES)}, "
            f"large={large_enabled()}, dists={_env_list('OPTEMBED_BENCH_DISTS', DISTS)}"]
