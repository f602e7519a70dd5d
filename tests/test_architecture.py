"""The package's layering: imports point down, no import circles, every method through one registry."""
import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "optembed_ext"

#: layer of each top-level part of the package; a module may import only from its own layer or lower ones
LAYERS = {
    "_ext": 0, "ops": 0, "reference": 0, "optim": 0, "_C": 0,
    "nn": 1, "models": 1, "data": 1,
    "train": 2,
    "results": 3,
    "export": 4,
    "search": 5, "integrations": 5,
    "cli": 6, "__main__": 6,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``optembed_ext`` module ``path`` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "optembed_ext")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "optembed_ext":
                continue
            out.add(mod)
            for a in node.names:  # `from . import ops` imports the submodule ops
                if (PKG.parent / Path(*(mod + "." + a.name).split("."))).with_suffix(".py").exists() or \
                        (PKG.parent / Path(*(mod + "." + a.name).split(".")) / "__init__.py").exists():
                    out.add(mod + "." + a.name)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_point_down():
    bad = []
    for mod, deps in _graph().items():
        part = _part(mod)
        if part not in LAYERS:  # the package root only re-exports lazily
            assert mod == "optembed_ext", f"{mod}: add its folder to LAYERS"
            continue
        for dep in deps:
            dpart = _part(dep)
            if dpart and dpart in LAYERS and LAYERS[dpart] > LAYERS[part]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "imports that point up:\n" + "\n".join(sorted(bad))


def test_lower_layers_never_import_methods_export_or_cli():
    for mod, deps in _graph().items():
        if _part(mod) in ("ops", "reference", "optim", "_ext", "nn", "models", "data", "train", "results"):
            assert not [d for d in deps if _part(d) in ("search", "export", "cli")], mod


def test_no_import_circles():
    graph = _graph()
    # a package's __init__ re-exporting its own submodules is not a circle: drop parent -> child edges
    edges = {m: {d for d in deps if d in graph and d != m and not d.startswith(m + ".")} for m, deps in graph.items()}
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_no_argparse_or_print_below_the_cli():
    for path in PKG.rglob("*.py"):
        mod = _module_name(path)
        if _part(mod) in ("cli", "__main__"):
            continue
        text = path.read_text()
        assert "import argparse" not in text, f"{mod} parses arguments: move it to optembed_ext/cli"


def test_every_builtin_method_is_registered():
    from optembed_ext.search.base import BUILTIN_METHODS, Method, registered_methods

    methods = registered_methods()
    assert list(methods)[:len(BUILTIN_METHODS)] == list(BUILTIN_METHODS)
    for name, cls in methods.items():
        assert issubclass(cls, Method) and cls.name == name
        cls()  # the default configuration is valid


# ---------------------------------------------------------------------------------- a toy method in one file
@dataclass
class HalfConfig:
    shrink: int = 2


@pytest.fixture
def half_method():
    from optembed_ext.nn import UniformEmbedding
    from optembed_ext.results import MethodResult
    from optembed_ext.search.base import Method, register_method, unregister_method
    from optembed_ext.search.common import make_row, train_and_evaluate

    @register_method
    class Half(Method):
        name = "half"
        config_class = HalfConfig
        help = "a uniform table at D / shrink"

        def build_embedding(self, feature_map, embed_dim):
            return UniformEmbedding(feature_map, max(1, embed_dim // self.config.shrink))

        def run(self, data, model_name, settings, run_dir=None):
            emb = self.build_embedding(data.feature_map, settings.embed_dim)
            _, res = train_and_evaluate(data, model_name, emb, settings.train, model_cfg=settings.model_cfg,
                                        run_dir=run_dir)
            return MethodResult(rows=[make_row(self.name, f"1/{self.config.shrink}", res)])

    yield Half
    unregister_method("half")


def test_a_toy_method_runs_in_compare_and_on_the_command_line(half_method, tmp_path, capsys):
    from optembed_ext.cli import main
    from optembed_ext.search.compare import CompareConfig, run_compare

    config = CompareConfig.from_dict({"datasets": ["synthetic-tiny"], "methods": ["uniform", "half"],
                                      "embed_dim": 8, "epochs": 1, "batch_size": 256, "mlp_dims": [8],
                                      "uniform_dims": [8], "synthetic_samples": 800, "half": {"shrink": 4}})
    rows = run_compare(config, out=tmp_path / "cmp")
    half = [r for r in rows if r["method"] == "half"]
    uniform = [r for r in rows if r["method"] == "uniform"]
    assert len(half) == 1 and half[0]["variant"] == "1/4"
    assert half[0]["num_params"] * 4 == uniform[0]["num_params"]
    assert "| half |" in (tmp_path / "cmp" / "table.md").read_text()
    with pytest.raises(ValueError, match="unknown half option"):
        CompareConfig.from_dict({"methods": ["half"], "half_grow": 3})

    out = tmp_path / "cli"
    assert main(["half", "--dataset", "synthetic-tiny", "--num-samples", "600", "--embed-dim", "8", "--mlp-dims",
                 "8", "--epochs", "1", "--shrink", "2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "half" and metrics["rows"][0]["variant"] == "1/2"
    assert "half 1/2" in capsys.readouterr().out


def test_export_needs_nothing_from_search(tmp_path):
    """The run-folder types live below both: a search result is read and rebuilt without the search package."""
    import optembed_ext.export.compact as compact
    import optembed_ext.results as results

    for mod in (compact, results):
        assert "search" not in {(_part(d)) for d in _imports(Path(mod.__file__))}, mod.__name__
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        compact.load_run(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="optembed_result.pt"):
        compact.load_run(tmp_path / "run")
    (tmp_path / "run" / results.RESULT_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="no-resume"):
        compact.load_run(tmp_path / "run")
