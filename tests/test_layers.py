"""The package's folders are layers: a module imports only from its own layer or below (checked on the
source, top-level and function-local imports alike), and no module keeps mutable state at import."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxrecover"
# bottom to top; "testing" builds tiny real checkpoints for tests, so it sits above io
LAYERS = ["_version", "core", "runtime", "data", "model", "sae", "recover", "io", "testing",
          "experiment", "paper", "audit", "cli"]
RANK = {name: i for i, name in enumerate(LAYERS)}


def _layer(module: str) -> str:
    """'jaxrecover.sae.clamp' -> 'sae'; the package root counts as the top (it re-exports)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxrecover"):
            if node.module == "jaxrecover":
                out += [(node.lineno, f"jaxrecover.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("jaxrecover")]
    return out


MODULES = sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downward(path: Path) -> None:
    rel = path.relative_to(ROOT)
    own = rel.parts[0].removesuffix(".py")
    assert own in RANK, f"{rel}: folder {own!r} is not a known layer {LAYERS}"
    upward = [f"line {n}: {m}" for n, m in _imports(path)
              if _layer(m) == "__init__" or RANK.get(_layer(m), -1) > RANK[own]]
    assert not upward, f"{rel} imports from a higher layer: {upward}"


def test_layer_packages_reexport_nothing() -> None:
    for init in ROOT.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        if init.parent.name in ("paper", "audit"):
            continue  # the setting registry; the audit's one Python call (jaxrecover.audit.run_audit)
        stmts = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert not stmts, f"{init.relative_to(ROOT)} should hold only its docstring"


# What a process has, not what a run has: the JAX distributed runtime (jax.distributed is itself
# process-wide), the lock files this process holds (released at exit), and the memo of file hashes
# keyed by file identity (device, inode, size, mtime: the same file always hashes the same).
PROCESS_WIDE = ("runtime/distributed.py", "runtime/report.py", "io/embedded.py")
MUTATORS = {"append", "extend", "update", "clear", "pop", "popitem", "setdefault", "add", "discard", "remove",
            "insert", "__setitem__"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_mutable_module_state(path: Path) -> None:
    """No function writes to a module-level name (``global``, item assignment or a mutating method on
    it): such state leaks from one run, test or setting into the next. Pass it, or hold it in one object."""
    tree = ast.parse(path.read_text())
    module_names = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    imported = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names if isinstance(n, ast.Import) or (n.module or "").startswith("jaxrecover")}
    bad = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        local = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        for node in ast.walk(fn):
            if isinstance(node, ast.Global):
                bad += [f"line {node.lineno}: global {n}" for n in node.names]
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                for tgt in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(tgt, ast.Subscript) and isinstance(tgt.value, ast.Name) \
                            and tgt.value.id in module_names - local:
                        bad.append(f"line {node.lineno}: {tgt.value.id}[...] =")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in MUTATORS and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id in module_names - local:
                bad.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}(...)")
        for node in ast.walk(fn):  # `module.NAME = value`: another module's globals set from here
            if isinstance(node, ast.Assign):
                bad += [f"line {node.lineno}: {ast.unparse(t)} =" for t in node.targets
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in imported]
    if str(path.relative_to(ROOT)) in PROCESS_WIDE:
        return
    assert not bad, f"{path.relative_to(ROOT)} writes module-level state: {bad}"
