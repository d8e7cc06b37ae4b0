"""The modules of align_jax import one another without a cycle: the graph of their imports (those
inside functions too) sorts topologically, and a fresh interpreter imports every module in that
order."""

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "align_jax"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The align_jax modules `path` imports: `import a.b`; `from a import b` (b if a module,
    else a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports(path, modules) - {name} for name, path in modules.items()}


def test_the_import_graph_has_no_cycle():
    order = list(graphlib.TopologicalSorter(import_graph()).static_order())  # CycleError if any
    assert order.index("align_jax.rewards") < order.index("align_jax.data.synthetic")
    assert order.index("align_jax.train.rl") < order.index("align_jax.train")


def test_a_fresh_interpreter_imports_every_module_in_topological_order():
    order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    script = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in order
                                            if m != "align_jax.__main__")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
