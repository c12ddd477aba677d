"""The package's layers: who may import whom, no import circles, and the runtime never imports
torch or model_export (docs/architecture.md, "Modules and their contracts")."""
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import streams

ROOT = Path(streams.__file__).parent

# layer -> the layers its modules may import (a layer may always import itself)
ALLOWED = {
    "contracts": set(),  # config, errors, events, state, bundle, bundle_watch, arms, quality, metrics
    "inference": {"contracts"},
    "kafka": {"contracts"},
    "local": {"contracts"},
    "longterm": {"contracts", "inference"},
    "worker": {"contracts", "inference", "kafka", "local", "longterm"},
    "tools": {"contracts", "inference", "kafka", "local", "longterm"},
    "bench": {"contracts", "inference", "kafka", "local", "longterm", "tools", "worker"},
    "cli": {"contracts", "inference", "kafka", "local", "longterm", "tools", "worker", "bench"},
}
SUBPACKAGES = {"kafka", "local", "longterm", "worker", "tools", "bench"}


def layer_of(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    if part in SUBPACKAGES or part == "inference":
        return part
    if part in ("cli", "__main__"):
        return "cli"
    return "contracts"


def all_modules() -> dict[str, Path]:
    found = {"streams": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="streams."):
        spec = info.module_finder.find_spec(info.name.rpartition(".")[2])
        if spec is not None and spec.origin:
            found[info.name] = Path(spec.origin)
    return found


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Every streams module `module` imports, at any depth of its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("streams")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("streams"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m != module}


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imports_of(m, p, set(modules)) for m, p in modules.items()}


def test_every_import_goes_in_an_allowed_direction():
    bad = []
    for module, targets in graph().items():
        here = layer_of(module)
        for target in targets:
            there = layer_of(target)
            if there != here and there not in ALLOWED[here] and target != "streams":
                bad.append(f"{module} ({here}) imports {target} ({there})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circles():
    edges = {m: {t for t in ts if t != "streams"} for m, ts in graph().items()}
    state, circles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_the_layer_map_knows_every_subpackage():
    found = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert found == SUBPACKAGES, found ^ SUBPACKAGES


def test_streams_imports_neither_torch_nor_model_export():
    names = sorted(m for m in all_modules() if m != "streams.__main__")
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {names!r}]; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'model_export', 'transformers')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
