"""First-contact check of the CUDA half on a GPU machine (no network): build, kernels present, CUDA tests,
compute-sanitizer, GPU benchmarks, DeepFM at Criteo shape; a summary table at the end. Called by gpu_check.sh.

    python scripts/gpu_check.py [--out DIR] [--stages build,kernels,tests,sanitizer,bench,model] [--budget 470]

Every stage writes its log under ``--out`` (default ``$OUT``, else ``gpu_check_out``); ``summary.json`` and
``summary.md`` hold the table printed at the end. The exit status is 0 only when every stage that ran passed.
A stage that does not fit in what is left of ``--budget`` seconds is reported as skipped (time), never as passed.

Stages:
  build      pip install --no-build-isolation --no-deps -e . with the CUDA kernels ON for the local GPU's
             architecture only (CMAKE_CUDA_ARCHITECTURES from torch.cuda.get_device_capability()).
  kernels    fails unless optembed_ext._ext.build_info()['with_cuda'] and ops.has_kernel(op, 'cuda') for every op,
             and the local architecture is among the compiled ones.
  tests      every CUDA test (pytest -k cuda over the op and optimizer tests) with OPTEMBED_REQUIRE_CUDA=1
             (a missing CUDA kernel fails instead of falling back to the reference).
  sanitizer  compute-sanitizer memcheck, racecheck and synccheck over scripts/gpu_op_cases.py (each op forward
             and backward once, small shapes, every code path the kernels have).
  bench      the CUDA cases of the op benchmarks (fused vs reference, FBGEMM when importable) at Criteo shape,
             their GB/s as a fraction of the device-to-device copy bandwidth measured in the same run.
  model      one supernet training step and one evaluation batch of DeepFM at Criteo shape (samples/s).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("build", "kernels", "tests", "sanitizer", "bench", "model")
#: seconds each stage may take at most (also the reserve it needs to start)
STAGE_LIMITS = {"build": 200, "kernels": 30, "tests": 90, "sanitizer": 90, "bench": 100, "model": 60}
TEST_FILES = ("tests/test_masked_embedding.py", "tests/test_compact_embedding.py", "tests/test_row_mask.py",
              "tests/test_sparse_row_update.py", "tests/test_optim.py", "tests/test_fused_update.py",
              "tests/test_kernels_present.py")
BENCH_FILES = ("benchmarks/bench_masked_embedding.py", "benchmarks/bench_sparse_row_update.py",
               "benchmarks/bench_compact_embedding.py", "benchmarks/bench_fbgemm.py")
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")


class Result:
    def __init__(self, stage: str, status: str, seconds: float = 0.0, detail: str = "", data: dict | None = None):
        self.stage, self.status, self.seconds, self.detail, self.data = stage, status, seconds, detail, data or {}

    def as_dict(self) -> dict:
        return {"stage": self.stage, "status": self.status, "seconds": round(self.seconds, 1),
                "detail": self.detail, "data": self.data}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder (default: $OUT)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all, in that order)")
    p.add_argument("--budget", type=float, default=470.0, help="total seconds for all stages (default 470)")
    p.add_argument("--python", default=sys.executable, help="interpreter with torch installed (default: this one)")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        p.error(f"--stages: unknown stage(s) {unknown or stages}; choose from {', '.join(STAGES)}")
    if not args.budget > 0:
        p.error(f"--budget must be > 0, got {args.budget}")
    args.stages = [s for s in STAGES if s in stages]
    return args


def run(cmd, log: Path, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` with output to ``log``; returns (exit status, last lines). 124 when it ran past ``timeout``."""
    full_env = dict(os.environ, **(env or {}))
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(str(c) for c in cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
            fh.write(f"\n[gpu_check] timed out after {timeout:.0f} s\n")
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return rc, " | ".join(tail)


def probe(python: str) -> dict:
    """Facts of the machine and of the installed extension, read in a fresh interpreter."""
    code = (
        "import json, torch\n"
        "info = {'cuda_available': torch.cuda.is_available(), 'torch': torch.__version__, 'torch_cuda': torch.version.cuda}\n"
        "if info['cuda_available']:\n"
        "    cap = torch.cuda.get_device_capability(0)\n"
        "    info.update(device=torch.cuda.get_device_name(0), arch=f'{cap[0]}{cap[1]}')\n"
        "try:\n"
        "    from optembed_ext import _ext, ops\n"
        "    b = _ext.build_info()\n"
        "    info['build'] = {k: b.get(k) for k in ('has_extension', 'with_cuda', 'cuda_archs', 'cuda_version', 'import_error')}\n"
        "    info['cuda_kernels'] = {op: ops.has_kernel(op, torch.device('cuda')) for op in ops.COMPILED_OPS}\n"
        "except Exception as exc:\n"
        "    info['build_error'] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(info))\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    if out.returncode != 0:
        return {"probe_error": out.stderr.strip().splitlines()[-1:] or ["probe failed"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def kernels_problem(info: dict) -> str | None:
    """Why the CUDA kernels are not usable, or None when they are."""
    if "probe_error" in info or "build_error" in info:
        return f"cannot import optembed_ext: {info.get('probe_error') or info.get('build_error')}"
    build = info.get("build") or {}
    if not build.get("has_extension"):
        return f"the compiled extension did not load ({build.get('import_error')})"
    if not build.get("with_cuda"):
        return "the CUDA kernels were not compiled (build_info()['with_cuda'] is False)"
    missing = sorted(op for op, ok in (info.get("cuda_kernels") or {}).items() if not ok)
    if missing:
        return f"no CUDA kernel registered for {', '.join(missing)}"
    if not info.get("cuda_available"):
        return "no CUDA device is visible to torch"
    compiled = {str(a).split("-")[0] for a in (build.get("cuda_archs") or [])}  # "90", "90-real", "90-virtual"
    if info.get("arch") and info["arch"] not in compiled:
        return f"the local architecture sm_{info['arch']} is not among the compiled ones {build.get('cuda_archs')}"
    return None


# ------------------------------------------------------------------------------------------------------ stages
def stage_build(args, out: Path, limit: float) -> Result:
    info = probe(args.python)
    if not info.get("cuda_available"):
        return Result("build", "FAIL", detail="no CUDA device visible to torch: nothing to build for")
    arch = info["arch"]
    cmd = [args.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", ".",
           "-Ccmake.define.OPTEMBED_WITH_CUDA=ON", f"-Ccmake.define.CMAKE_CUDA_ARCHITECTURES={arch}",
           "-Cbuild-dir=build/gpu_check"]
    rc, tail = run(cmd, out / "build.log", limit, env={"MAX_JOBS": str(os.cpu_count() or 4),
                                                       "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 4)})
    return Result("build", "PASS" if rc == 0 else "FAIL", detail=f"sm_{arch}" + ("" if rc == 0 else f": {tail}"))


def stage_kernels(args, out: Path, limit: float) -> Result:
    info = probe(args.python)
    (out / "kernels.json").write_text(json.dumps(info, indent=1))
    problem = kernels_problem(info)
    if problem:
        return Result("kernels", "FAIL", detail=problem, data=info)
    n = len(info["cuda_kernels"])
    return Result("kernels", "PASS", detail=f"{n} ops with CUDA kernels, archs {info['build']['cuda_archs']}",
                  data=info)


def _junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def stage_tests(args, out: Path, limit: float) -> Result:
    files = [f for f in TEST_FILES if (ROOT / f).exists()]
    junit = out / "tests.xml"
    cmd = [args.python, "-m", "pytest", *files, "-k", "cuda", "-q", "-ra", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    rc, tail = run(cmd, out / "tests.log", limit, env={"OPTEMBED_REQUIRE_CUDA": "1"})
    counts = _junit_counts(junit)
    ran = counts.get("tests", 0) - counts.get("skipped", 0)
    ok = rc == 0 and ran > 0
    detail = (f"{ran} CUDA tests ran, {counts.get('failures', 0) + counts.get('errors', 0)} failed, "
              f"{counts.get('skipped', 0)} skipped") if counts else tail
    if rc == 0 and ran == 0:
        detail = "no CUDA test ran (all skipped)"
    return Result("tests", "PASS" if ok else "FAIL", detail=detail, data=counts)


def stage_sanitizer(args, out: Path, limit: float) -> Result:
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(tool).exists():
        return Result("sanitizer", "FAIL", detail="compute-sanitizer not found")
    per_tool = limit / len(SANITIZER_TOOLS)
    results, bad = {}, []
    for t in SANITIZER_TOOLS:
        extra = ["--racecheck-report", "all"] if t == "racecheck" else []
        cmd = [tool, "--tool", t, "--error-exitcode", "3", "--target-processes", "all", *extra, args.python,
               "scripts/gpu_op_cases.py"]
        rc, tail = run(cmd, out / f"sanitizer_{t}.log", per_tool)
        results[t] = rc
        if rc != 0:
            bad.append(f"{t} rc={rc}")
    return Result("sanitizer", "PASS" if not bad else "FAIL",
                  detail=", ".join(bad) if bad else "memcheck, racecheck, synccheck clean", data=results)


def copy_bandwidth_gbps(python: str) -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB buffer, median of 10."""
    code = (
        "import torch, statistics\n"
        "n = 1 << 28\n"
        "a = torch.empty(n, device='cuda'); b = torch.empty_like(a)\n"
        "for _ in range(3): b.copy_(a)\n"
        "ts = []\n"
        "for _ in range(10):\n"
        "    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)\n"
        "    s.record(); b.copy_(a); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) / 1e3)\n"
        "print(2 * 4 * n / statistics.median(ts) / 1e9)\n"
    )
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    try:
        return float(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def stage_bench(args, out: Path, limit: float) -> Result:
    copy = copy_bandwidth_gbps(args.python)
    files = [f for f in BENCH_FILES if (ROOT / f).exists()]
    js = out / "bench.json"
    cmd = [args.python, "-m", "pytest", *files, "-k", "cuda", "-q", "-p", "no:cacheprovider",
           "--benchmark-min-rounds=3", "--benchmark-max-time=0.1",
           f"--optembed-json={js}", f"--optembed-md={out / 'bench.md'}"]
    rc, tail = run(cmd, out / "bench.log", max(10.0, limit - 15),
                   env={"OPTEMBED_BENCH_SHAPES": "criteo", "OPTEMBED_BENCH_DISTS": "zipf"})
    rows = []
    try:
        records = json.loads(js.read_text()).get("records", [])
    except (OSError, ValueError):
        records = []
    for r in records:
        gbps = r.get("gbps")
        rows.append({"suite": r.get("suite"), "case": r.get("case"), "impl": r.get("impl"),
                     "ms": round(r.get("median_s", 0) * 1e3, 4) if r.get("median_s") else None,
                     "speedup": r.get("speedup"), "gbps": gbps,
                     "copy_fraction": (gbps / copy) if (gbps and copy) else None})
    (out / "bench_copy_fraction.json").write_text(json.dumps({"copy_gbps": copy, "cases": rows}, indent=1))
    ok = rc == 0 and bool(rows)
    detail = f"{len(rows)} cases, copy bandwidth {copy:.0f} GB/s" if copy else f"{len(rows)} cases"
    return Result("bench", "PASS" if ok else "FAIL", detail=detail if ok else f"{detail}; {tail}",
                  data={"copy_gbps": copy, "cases": rows})


def stage_model(args, out: Path, limit: float) -> Result:
    js = out / "model.json"
    rc, tail = run([args.python, "scripts/gpu_model_step.py", "--json", js], out / "model.log", limit)
    try:
        data = json.loads(js.read_text())
    except (OSError, ValueError):
        data = {}
    if rc != 0 or not data:
        return Result("model", "FAIL", detail=tail, data=data)
    return Result("model", "PASS", data=data,
                  detail=f"DeepFM criteo: train step {data['train_samples_per_s']:.3g} samples/s, "
                         f"eval {data['eval_samples_per_s']:.3g} samples/s")


RUNNERS = {"build": stage_build, "kernels": stage_kernels, "tests": stage_tests, "sanitizer": stage_sanitizer,
           "bench": stage_bench, "model": stage_model}


# ------------------------------------------------------------------------------------------------------ summary
def format_summary(results: list[Result]) -> str:
    """The table printed at the end (Markdown), stages then the benchmark and model figures."""
    lines = ["| stage | status | seconds | detail |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.stage} | {r.status} | {r.seconds:.0f} | {r.detail} |")
    bench = next((r for r in results if r.stage == "bench" and r.data.get("cases")), None)
    if bench is not None:
        lines += ["", f"copy bandwidth (device to device): {bench.data.get('copy_gbps') or 0:.0f} GB/s", "",
                  "| suite | case | impl | ms | speedup | GB/s | of copy |", "|---|---|---|---|---|---|---|"]
        for c in bench.data["cases"]:
            frac = f"{c['copy_fraction']:.0%}" if c.get("copy_fraction") else ""
            gbps = f"{c['gbps']:.1f}" if c.get("gbps") else ""
            speed = f"x{c['speedup']:.2f}" if c.get("speedup") else ""
            lines.append(f"| {c['suite']} | {c['case']} | {c['impl']} | {c['ms']} | {speed} | {gbps} | {frac} |")
    model = next((r for r in results if r.stage == "model" and r.data), None)
    if model is not None:
        d = model.data
        lines += ["", "| DeepFM, Criteo shape | ms | samples/s |", "|---|---|---|",
                  f"| supernet train step (B={d.get('train_batch')}) | {d.get('train_ms', 0):.2f} | "
                  f"{d.get('train_samples_per_s', 0):.4g} |",
                  f"| evaluation batch (B={d.get('eval_batch')}) | {d.get('eval_ms', 0):.2f} | "
                  f"{d.get('eval_samples_per_s', 0):.4g} |"]
    overall = "PASS" if results and all(r.status == "PASS" for r in results) else "FAIL"
    lines += ["", f"overall: {overall}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results: list[Result] = []
    for stage in args.stages:
        left = args.budget - (time.monotonic() - start)
        limit = min(STAGE_LIMITS[stage], left)
        if limit < min(30.0, STAGE_LIMITS[stage]):
            results.append(Result(stage, "SKIPPED", detail=f"time: {left:.0f} s of the budget left"))
            continue
        print(f"[gpu_check] {stage} (up to {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            res = RUNNERS[stage](args, out, limit)
        except Exception as exc:  # noqa: BLE001 - a stage that breaks is a failed stage, the others still run
            res = Result(stage, "FAIL", detail=f"{type(exc).__name__}: {exc}")
        res.seconds = time.monotonic() - t0
        results.append(res)
        print(f"[gpu_check] {stage}: {res.status} {res.detail}", flush=True)
        if stage in ("build", "kernels") and res.status != "PASS":
            # nothing after this can be trusted: the tests would run the reference, not the kernels
            for later in args.stages[args.stages.index(stage) + 1:]:
                results.append(Result(later, "SKIPPED", detail=f"{stage} failed"))
            break
    summary = format_summary(results)
    (out / "summary.md").write_text(summary + "\n")
    (out / "summary.json").write_text(json.dumps([r.as_dict() for r in results], indent=1))
    print("\n" + summary, flush=True)
    return 0 if results and all(r.status == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
