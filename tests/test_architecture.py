"""Imports run one way: every module of compress/ sits in a layer and imports only its own
layer and the ones below; no import cycles, counting imports inside functions too.

LAYERS is the one statement of the layer order. docs/architecture.md shows the same table,
and the last test checks that the two agree.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "compress"

# module or package (a package covers its submodules) -> layer. A module may import modules
# of its own layer (without cycles) and of lower layers, never of a higher one.
LAYERS = {
    # 0 - the exception types
    "compress.errors": 0,
    # 1 - foundations: typed configs, the machine, processes, model anatomy, metrics, artifacts
    "compress.config": 1,
    "compress.hardware": 1,
    "compress.distributed": 1,
    "compress.anatomy": 1,
    "compress.metrics": 1,
    "compress.artifacts": 1,
    "compress.ort_settings": 1,
    "compress.svg": 1,
    "compress.onnx_graph": 1,
    # 2 - data and models
    "compress.data": 2,
    "compress.lm_data": 2,
    "compress.austen": 2,
    "compress.models": 2,
    "compress.lineage": 2,
    # 3 - tasks: what differs between classification and causal LM
    "compress.tasks": 3,
    # 4 - runners: score any artifact through one interface (they ask the task how to load it)
    "compress.runners": 4,
    # 5 - the training loop and its helpers
    "compress.loop": 5,
    "compress.curves": 5,
    # 6 - stages: artifact -> artifact
    "compress.train": 6,
    "compress.distill": 6,
    "compress.eval": 6,
    "compress.export": 6,
    "compress.export_lm": 6,
    "compress.quantize": 6,
    "compress.generate": 6,
    "compress.bench": 6,
    # 7 - entry points: the command table, recipes, `python -m compress`, the package
    "compress.cli": 7,
    "compress.recipe": 7,
    "compress.__main__": 7,
    "compress": 7,
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The compress modules `name` imports, anywhere in the file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "compress")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] != "compress":
                continue
            for alias in node.names:  # `from compress.x import y` imports module x.y when there is one
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer_of(module: str) -> int | None:
    """The layer of the longest LAYERS entry that is `module` or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    missing = sorted(m for m in modules() if layer_of(m) is None)
    assert not missing, (f"modules without a layer: {', '.join(missing)}. Add them to LAYERS in "
                         "tests/test_architecture.py and to the table in docs/architecture.md.")


def test_no_import_runs_up_a_layer():
    wrong = []
    for module, targets in sorted(graph().items()):
        mine = layer_of(module)
        for target in sorted(targets):
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not wrong, "imports against the layer order (docs/architecture.md):\n  " + "\n  ".join(wrong)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_document_shows_the_same_layers():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\|\s*(\d+)\s*\|[^|]*\|([^|]*)\|", doc, flags=re.M)
    shown = {name.strip(" `"): int(layer) for layer, cell in rows for name in cell.split(",") if name.strip(" `")}
    assert shown == LAYERS, (f"docs/architecture.md and LAYERS differ: only in the doc {sorted(set(shown) - set(LAYERS))}, "
                             f"only in the test {sorted(set(LAYERS) - set(shown))}, different layer "
                             f"{sorted(k for k in set(shown) & set(LAYERS) if shown[k] != LAYERS[k])}")
