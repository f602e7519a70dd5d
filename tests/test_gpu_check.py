"""scripts/gpu_check.sh / gpu_check.py on a machine without a GPU: argument handling, the summary table, and the
failure (never a pass) when the CUDA kernels are missing."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, out=None, timeout=120):
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args]
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_arguments(gc, tmp_path):
    args = gc.parse_args(["--out", str(tmp_path), "--stages", "model,kernels", "--budget", "60"])
    assert args.stages == ["kernels", "model"]  # always in the pipeline's order
    assert args.budget == 60
    for bad in (["--stages", "kernels,nope"], ["--stages", ""], ["--budget", "0"]):
        with pytest.raises(SystemExit) as exc:
            gc.parse_args(bad)
        assert exc.value.code == 2
    res = _run("--help")
    assert res.returncode == 0 and "--stages" in res.stdout


def test_summary_table(gc):
    results = [gc.Result("kernels", "PASS", 1.2, "7 ops"),
               gc.Result("bench", "PASS", 30, "2 cases", data={"copy_gbps": 4000.0, "cases": [
                   {"suite": "masked_embedding", "case": "fwd criteo zipf", "impl": "fused", "ms": 0.5,
                    "speedup": 3.0, "gbps": 2000.0, "copy_fraction": 0.5}]}),
               gc.Result("model", "PASS", 5, "ok", data={"train_batch": 2048, "train_ms": 10.0,
                                                         "train_samples_per_s": 204800.0, "eval_batch": 8192,
                                                         "eval_ms": 4.0, "eval_samples_per_s": 2048000.0})]
    text = gc.format_summary(results)
    assert "| kernels | PASS |" in text and "| masked_embedding | fwd criteo zipf | fused | 0.5 | x3.00 | 2000.0 | 50% |" in text
    assert "copy bandwidth (device to device): 4000 GB/s" in text
    assert "| supernet train step (B=2048) | 10.00 | 2.048e+05 |" in text
    assert text.endswith("overall: PASS")
    assert gc.format_summary(results + [gc.Result("tests", "SKIPPED", 0, "time")]).endswith("overall: FAIL")


def test_kernel_problems(gc):
    ok = {"cuda_available": True, "arch": "90", "build": {"has_extension": True, "with_cuda": True,
                                                          "cuda_archs": ["90"]},
          "cuda_kernels": {"row_mask": True}}
    assert gc.kernels_problem(ok) is None
    assert "not compiled" in gc.kernels_problem({**ok, "build": {**ok["build"], "with_cuda": False}})
    assert "row_mask" in gc.kernels_problem({**ok, "cuda_kernels": {"row_mask": False}})
    assert "sm_80" in gc.kernels_problem({**ok, "arch": "80"})
    assert "did not load" in gc.kernels_problem({**ok, "build": {"has_extension": False, "import_error": "x"}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without a GPU")
def test_fails_without_cuda_kernels(tmp_path):
    res = _run("--stages", "kernels,tests", out=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["status"] for r in summary] == ["FAIL", "SKIPPED"]
    assert "CUDA" in summary[0]["detail"] or "cuda" in summary[0]["detail"]
    assert "overall: FAIL" in res.stdout and (tmp_path / "summary.md").exists()
    assert (tmp_path / "kernels.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without a GPU")
def test_build_refuses_without_a_gpu(tmp_path):
    res = _run("--stages", "build", out=tmp_path)
    assert res.returncode == 1
    assert "no CUDA device" in json.loads((tmp_path / "summary.json").read_text())[0]["detail"]


def test_budget_skips_stages_that_do_not_fit(tmp_path):
    res = _run("--stages", "model", "--budget", "5", out=tmp_path)
    assert res.returncode == 1
    assert json.loads((tmp_path / "summary.json").read_text())[0]["status"] == "SKIPPED"
