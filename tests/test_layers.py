"""The package's layers (docs/DESIGN.md): every import, lazy ones inside functions included, points down, and no
package module patches another module's attributes. Both are checked on the source with `ast`, so they hold for
code paths the other tests never run."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

PKG = Path(__file__).resolve().parents[1] / "cheers_deploy"

# Bottom first. A module may import modules of its own part (same top-level name under cheers_deploy) and of any
# part in an earlier group; an import of a part in the same or a later group is a back edge.
LAYERS: List[Tuple[str, ...]] = [
    ("errors",),
    ("constants", "fileio"),
    ("config", "manifest"),
    ("tokenizer", "data"),
    ("processor",),
    ("checkpoint", "world_tokenizer", "hub", "vocabulary"),
    ("model", "trt", "graphs"),
    ("testing",),
    ("runtime",),
    ("eval", "export", "train"),
    ("precision",),
    ("build",),
    ("bench", "doctor"),
    ("serve", "triton"),
    ("cli",),
    ("demo", "__init__"),
]
RANK: Dict[str, int] = {part: i for i, group in enumerate(LAYERS) for part in group}


def _modules() -> Dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _part(module: str) -> Optional[str]:
    """'cheers_deploy.runtime.pipeline' -> 'runtime'; the package itself -> '__init__'; outside -> None."""
    bits = module.split(".")
    if bits[0] != "cheers_deploy":
        return None
    return bits[1] if len(bits) > 1 else "__init__"


def _imports(module: str, path: Path) -> List[Tuple[int, str]]:
    """(line, absolute module) of every import in the file, function-level ones included."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[:len(base) - (node.level - 1)]
                target = ".".join(root + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module:                            # `from .. import x` imports x, not the package itself
                out.append((node.lineno, target))
            # `from . import x` / `from .. import runtime`: the imported names may be modules themselves
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return out


def test_every_part_has_a_layer():
    parts = {_part(m) for m in _modules()}
    unknown = sorted(p for p in parts if p not in RANK)
    assert not unknown, f"add these parts of cheers_deploy to LAYERS (and docs/DESIGN.md): {unknown}"


def test_imports_point_down():
    mods = _modules()
    back = []
    for mod, path in mods.items():
        own = _part(mod)
        for line, target in _imports(mod, path):
            other = _part(target)
            if other is None or other == own:
                continue
            if other not in RANK:                       # `from .. import x` where x is not a module part
                continue
            if RANK[other] >= RANK[own]:
                back.append(f"{path.relative_to(PKG.parent)}:{line} ({own}) imports {target} ({other})")
    assert not back, "imports that do not point down a layer:\n" + "\n".join(back)


def test_the_checker_sees_a_back_edge(tmp_path):
    """The walker resolves relative and lazy imports (a checker that found nothing would pass silently)."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from ..build import engines\n    from . import backend\n")
    got = [t for _, t in _imports("cheers_deploy.runtime.x", src)]
    assert "cheers_deploy.build" in got and "cheers_deploy.build.engines" in got
    assert "cheers_deploy.runtime.backend" in got


def _imported_names(tree: ast.Module, module: str, is_pkg: bool) -> Set[str]:
    """Names bound by imports of cheers_deploy modules or objects (whatever the import's depth)."""
    names = set()
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                target = ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            if target.startswith("cheers_deploy"):
                names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("cheers_deploy")}
    return names


MUTATORS = {"setdefault", "update", "append", "extend", "insert", "pop", "clear", "__setitem__", "add"}


def _patches(path: Path, module: str) -> List[str]:
    tree = ast.parse(path.read_text(), str(path))
    imported = _imported_names(tree, module, path.name == "__init__.py")
    found = []

    def root(n):
        while isinstance(n, (ast.Attribute, ast.Subscript)):
            n = n.value
        return n.id if isinstance(n, ast.Name) else None

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        for t in targets:
            if isinstance(t, (ast.Attribute, ast.Subscript)) and root(t) in imported:
                found.append(f"{path.name}:{node.lineno} assigns into {ast.unparse(t)}")
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("setattr", "delattr") and node.args \
                    and root(node.args[0]) in imported:
                found.append(f"{path.name}:{node.lineno} {f.id}({ast.unparse(node.args[0])}, ...)")
            if isinstance(f, ast.Attribute) and f.attr in MUTATORS and root(f.value) in imported:
                found.append(f"{path.name}:{node.lineno} mutates {ast.unparse(f.value)} of another module")
            if isinstance(f, ast.Attribute) and f.attr == "MethodType":
                found.append(f"{path.name}:{node.lineno} binds a method with types.MethodType")
    return found


def test_no_module_patches_another():
    found = []
    for mod, path in _modules().items():
        found += [f"{path.relative_to(PKG.parent)}: {x}" for x in _patches(path, mod)]
    assert not found, "package code patches other modules (extend through options or observers):\n" + "\n".join(found)


def test_the_patch_finder_sees_a_patch(tmp_path):
    src = tmp_path / "p.py"
    src.write_text("from ..model import qwen2\nfrom .workdir import BACKENDS\nimport types\n"
                   "def f(m):\n    qwen2.attention = None\n    BACKENDS.setdefault('x', 1)\n"
                   "    m.forward = types.MethodType(f, m)\n    self_ok = {}\n    self_ok['a'] = 1\n")
    got = _patches(src, "cheers_deploy.runtime.p")
    assert len(got) == 3, got


@pytest.mark.parametrize("part", ["runtime", "trt"])
def test_runtime_never_imports_producers(part):
    """The runtime (and the TensorRT adapter under it) never reaches export, build, precision or train."""
    bad = []
    for mod, path in _modules().items():
        if _part(mod) != part:
            continue
        for line, target in _imports(mod, path):
            if _part(target) in ("export", "build", "precision", "train"):
                bad.append(f"{path.name}:{line} {target}")
    assert not bad, bad
