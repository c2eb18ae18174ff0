"""Which TensorRT Python names the package and the fakes use, and the checks of those names against a description of
the real bindings (tests/trt_api/dump.py output). Used by tests/test_trt_real_api.py.

* `code_uses()`: an AST walk of cheers_deploy/trt/*, build/engines.py and runtime/trt_backend.py. An expression is
  a TensorRT object when it is the module (`trt`, `self.trt`), a variable named by convention (`engine`, `ctx`,
  `runtime`, `parser`, `reg`, ... : CONVENTIONS), a local assigned from one, or what a known call returns
  (RETURNS: `trt.Runtime(...)` is a Runtime, `runtime.deserialize_cuda_engine(...)` an ICudaEngine, ...).
  Attribute reads, writes, calls (with their positional count and keyword names), `getattr`/`hasattr` with a
  constant or a loop over constants, and calls through a local bound to `getattr(obj, "name")` are recorded.
* `fake_api()`: what tests/fakes/trt.py defines for the `tensorrt` module and its classes.
* `check_table`, `check_calls`, `check_fakes`: the problems of each against one real bindings version.
"""
from __future__ import annotations

import ast
import enum
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from cheers_deploy.trt import compat

REPO = Path(__file__).resolve().parents[2]
FILES = [REPO / "cheers_deploy" / "trt" / f for f in ("compat.py", "plugin.py", "layout.py", "device_memory.py")] + \
        [REPO / "cheers_deploy" / "build" / "engines.py", REPO / "cheers_deploy" / "runtime" / "trt_backend.py"]
MODULE = "tensorrt"
CONVENTIONS = {"trt": MODULE, "self.trt": MODULE, "engine": "ICudaEngine", "self.engine": "ICudaEngine",
               "e.engine": "ICudaEngine", "ctx": "IExecutionContext", "context": "IExecutionContext",
               "runtime": "Runtime", "self._runtime": "Runtime", "parser": "OnnxParser", "reg": "IPluginRegistry"}
RETURNS = {(MODULE, "Runtime"): "Runtime", (MODULE, "OnnxParser"): "OnnxParser", (MODULE, "Logger"): "Logger",
           (MODULE, "get_plugin_registry"): "IPluginRegistry", ("Runtime", "deserialize_cuda_engine"): "ICudaEngine",
           ("ICudaEngine", "create_execution_context"): "IExecutionContext",
           ("ICudaEngine", "create_execution_context_without_device_memory"): "IExecutionContext",
           ("OnnxParser", "get_error"): "ParserError"}
#: uses the walk cannot resolve (a getattr whose name is a parameter), stated here: (owner, member, positional args)
STATED = {"compat.py:parser_errors.get": [("ParserError", m, 0) for m in ("node", "node_name", "node_operator",
                                                                             "desc", "code")]}


_NOT_TRT = "<not TensorRT>"


@dataclass
class Use:
    where: str
    owner: str
    member: str
    how: str                               # read | write | call | probe (existence test: getattr default/hasattr)
    npos: int = 0
    kwargs: Tuple[str, ...] = ()


@dataclass
class _Scope:
    env: Dict[str, str] = field(default_factory=dict)              # local name -> owner
    loops: Dict[str, List[str]] = field(default_factory=dict)      # loop variable -> the constant strings
    aliases: Dict[str, List[Tuple[str, str]]] = field(default_factory=dict)   # local -> [(owner, member)]


class _Walker(ast.NodeVisitor):
    def __init__(self, fname: str):
        self.fname, self.uses, self.unresolved = fname, [], []
        self.scope, self.func = _Scope(), "<module>"

    # ---- resolution
    def _dotted(self, node) -> Optional[str]:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            return f"{node.value.id}.{node.attr}"
        return None

    def owner(self, node) -> Optional[str]:
        d = self._dotted(node)
        if isinstance(node, ast.Name):
            found = self.scope.env.get(node.id, CONVENTIONS.get(node.id))
            return None if found == _NOT_TRT else found
        if d is not None and d in CONVENTIONS:
            return CONVENTIONS[d]
        if isinstance(node, ast.Attribute):
            base = self.owner(node.value)
            return node.attr if base == MODULE and node.attr in compat.TRT_API else None
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):
                base = self.owner(f.value)
                return RETURNS.get((base, f.attr)) if base else None
            if isinstance(f, ast.Name) and f.id == "getattr" and len(node.args) >= 2:
                base = self.owner(node.args[0])
                names = self.strings(node.args[1])
                if base == MODULE and names and len(names) == 1 and names[0] in compat.TRT_API:
                    return names[0]
            if isinstance(f, ast.Name) and f.id in self.scope.aliases:
                rets = {RETURNS.get(a) for a in self.scope.aliases[f.id]}
                return rets.pop() if len(rets) == 1 else None
        return None

    def strings(self, node) -> Optional[List[str]]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Name) and node.id in self.scope.loops:
            return self.scope.loops[node.id]
        return None

    def record(self, node, owner, member, how, call: Optional[ast.Call] = None):
        npos = len(call.args) if call is not None else 0
        kws = tuple(k.arg for k in call.keywords) if call is not None else ()
        self.uses.append(Use(f"{self.fname}:{node.lineno}", owner, member, how, npos, kws))

    # ---- scopes
    def visit_FunctionDef(self, node):
        outer, outer_func = self.scope, self.func
        self.scope = _Scope(dict(outer.env), dict(outer.loops), dict(outer.aliases))
        self.func = node.name if outer_func == "<module>" else f"{outer_func}.{node.name}"
        for a in node.args.args + node.args.kwonlyargs:         # `runtime: dict` is no TensorRT Runtime
            if a.annotation is not None and a.arg in CONVENTIONS:
                self.scope.env[a.arg] = _NOT_TRT
        self.generic_visit(node)
        self.scope, self.func = outer, outer_func

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_For(self, node):
        if isinstance(node.target, ast.Name) and isinstance(node.iter, (ast.Tuple, ast.List)) and node.iter.elts \
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.iter.elts):
            self.scope.loops[node.target.id] = [e.value for e in node.iter.elts]
        self.generic_visit(node)

    def visit_Assign(self, node):
        self.generic_visit(node)
        if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
            return
        name, value = node.targets[0].id, node.value
        self.scope.aliases.pop(name, None)
        alias = self._alias(value)
        if alias:
            self.scope.aliases[name] = alias
        owner = self.owner(value)
        if owner is not None:
            self.scope.env[name] = owner
        else:
            self.scope.env.pop(name, None)

    def _alias(self, value) -> List[Tuple[str, str]]:
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "getattr" \
                and len(value.args) >= 2:
            base, names = self.owner(value.args[0]), self.strings(value.args[1])
            if base and names:
                return [(base, n) for n in names]
        if isinstance(value, ast.Attribute):
            base = self.owner(value.value)
            if base and not (base == MODULE and value.attr in compat.TRT_API):
                return [(base, value.attr)]
        return []

    # ---- uses
    def visit_Attribute(self, node):
        base = self.owner(node.value)
        if base is not None:
            self.record(node, base, node.attr, "write" if isinstance(node.ctx, ast.Store) else "read")
        self.generic_visit(node)

    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Attribute):
            base = self.owner(f.value)
            if base is not None:
                self.record(node, base, f.attr, "call", node)
            self.visit(f.value)
        elif isinstance(f, ast.Name) and f.id in ("getattr", "hasattr") and len(node.args) >= 2:
            base = self.owner(node.args[0])
            if base is not None:
                names = self.strings(node.args[1])
                if names is None:
                    self.unresolved.append(f"{self.fname}:{self.func}")
                for n in names or ():
                    probe = f.id == "hasattr" or len(node.args) == 3
                    self.record(node, base, n, "probe" if probe else "read")
            self.visit(node.args[0])
        elif isinstance(f, ast.Name) and f.id in self.scope.aliases:
            for base, member in self.scope.aliases[f.id]:
                self.record(node, base, member, "call", node)
        else:
            self.visit(f)
        for a in node.args[(2 if isinstance(f, ast.Name) and f.id in ("getattr", "hasattr") else 0):]:
            self.visit(a)
        for k in node.keywords:
            self.visit(k.value)


def code_uses(files=FILES) -> Tuple[List[Use], List[str]]:
    """(every TensorRT use found in `files` plus the STATED ones, the scopes of getattr calls it could not resolve)."""
    uses, unresolved = [], []
    for path in files:
        w = _Walker(path.name)
        w.visit(ast.parse(path.read_text(), str(path)))
        uses += w.uses
        unresolved += w.unresolved
    for where, items in STATED.items():
        uses += [Use(where, o, m, "call", n) for o, m, n in items]
    return uses, unresolved


# ---------------------------------------------------------------------------------------------------------------------
# signatures
# ---------------------------------------------------------------------------------------------------------------------
def _split(params: str) -> List[str]:
    out, depth, cur = [], 0, ""
    for ch in params:
        if ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [p.strip() for p in out]


def parse_signature(sig: str) -> List[Tuple[str, bool]]:
    """pybind11's "self: T, name: T, other: T = default" -> [(name, has_default)] without self."""
    params = []
    for p in _split(sig):
        name = p.split(":", 1)[0].split("=", 1)[0].strip()
        if name != "self":
            params.append((name, "=" in p))
    return params


def accepts(params: List[Tuple[str, bool]], npos: int, kwargs: Tuple[str, ...]) -> bool:
    if npos > len(params):
        return False
    rest = params[npos:]
    names = {n for n, _ in rest}
    return set(kwargs) <= names and all(d or n in kwargs for n, d in rest)


def real_member(desc: dict, owner: str, member: str) -> Optional[dict]:
    o = desc["owners"].get(owner)
    return None if o is None else o.get(member)


def _major(desc: dict) -> int:
    return compat.version_tuple(desc["version"])[0]


# ---------------------------------------------------------------------------------------------------------------------
# checks (each returns a list of problems, empty = fine)
# ---------------------------------------------------------------------------------------------------------------------
def check_table(desc: dict, table=None) -> List[str]:
    """Every TRT_API entry exists in the versions it is required in, and is absent where it is marked 10.x-only."""
    table = compat.TRT_API if table is None else table
    major, problems = _major(desc), []
    for owner, members in table.items():
        for member, (lo, hi) in members.items():
            want = lo <= major and (hi is None or major < hi)
            have = real_member(desc, owner, member) is not None
            if want and not have:
                problems.append(f"{owner}.{member}: missing from TensorRT {desc['version']}")
            elif have and not want:
                problems.append(f"{owner}.{member}: marked {lo}.x-only in compat.TRT_API but TensorRT "
                                f"{desc['version']} has it")
    return problems


def check_calls(desc: dict, uses: List[Use]) -> List[str]:
    """Each use has the right kind (called -> callable with an overload taking those arguments; read -> not a method;
    written -> a settable property) where the member exists."""
    problems = []
    for u in uses:
        r = real_member(desc, u.owner, u.member)
        if r is None:
            continue                                  # existence is check_table's job (version-dependent)
        kind = r["kind"]
        if u.how == "call":
            if kind not in ("method", "function", "static", "class"):
                problems.append(f"{u.where}: {u.owner}.{u.member}(...) is called, but it is a {kind}")
                continue
            sigs = [parse_signature(s) for s in r.get("signatures", [])]
            if not sigs:
                problems.append(f"{u.where}: {u.owner}.{u.member}: no signature in the docstring")
            elif not any(accepts(s, u.npos, u.kwargs) for s in sigs):
                problems.append(f"{u.where}: {u.owner}.{u.member} called with {u.npos} positional argument(s) and "
                                f"keywords {list(u.kwargs)}; TensorRT {desc['version']} has {r['signatures']}")
        elif u.how == "read" and kind in ("method", "static"):
            problems.append(f"{u.where}: {u.owner}.{u.member} is read as an attribute, but it is a method")
        elif u.how == "write" and not (kind == "property" and r.get("settable")):
            problems.append(f"{u.where}: {u.owner}.{u.member} is assigned, but it is a {kind} "
                            f"(settable: {r.get('settable')})")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# the fakes
# ---------------------------------------------------------------------------------------------------------------------
#: fake bookkeeping that is not TensorRT API
FAKE_ONLY = {"cudart", "executions", "ran", "capture_unsafe", "deserialized", "reset"}


def fake_classes():
    from fakes import trt as f

    return {"ICudaEngine": f.FakeEngine, "IExecutionContext": f.FakeContext, "Runtime": f._Runtime,
            "OnnxParser": f._OnnxParser, "ParserError": f._ParserError, "IPluginRegistry": f._PluginRegistry,
            "Logger": f._Logger}


#: attributes the fakes set on instances (not visible on the class), and the real class that has them
FAKE_INSTANCE_ATTRS = {"IPluginCreatorV3One": ("name", "plugin_version", "plugin_namespace"),
                       "Logger": ("min_severity",)}


def _params(fn, drop_first: bool) -> List[Tuple[str, bool]]:
    ps = list(inspect.signature(fn).parameters.values())
    if drop_first:
        ps = ps[1:]
    return [(p.name, p.default is not inspect.Parameter.empty) for p in ps
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def fake_api() -> List[Tuple[str, str, dict]]:
    """(owner, member, description) of everything the fakes define as TensorRT API."""
    from fakes import trt as f

    out = []
    for name, value in vars(f.FakeTrt).items():
        if name.startswith("_") and name != "__version__" or name in FAKE_ONLY:
            continue
        if isinstance(value, type) and issubclass(value, enum.Enum):
            out.append((MODULE, name, {"kind": "enum", "members": {k: int(v) for k, v in value.__members__.items()}}))
        elif isinstance(value, type):
            out.append((MODULE, name, {"kind": "class", "params": _params(value.__init__, True)}))
        elif isinstance(value, (staticmethod, classmethod)):
            out.append((MODULE, name, {"kind": "function",
                                       "params": _params(value.__func__, isinstance(value, classmethod))}))
        else:
            out.append((MODULE, name, {"kind": "value"}))
    for owner, cls in fake_classes().items():
        for name, value in vars(cls).items():
            if name.startswith("_"):
                continue
            if isinstance(value, property):
                out.append((owner, name, {"kind": "property", "settable": value.fset is not None}))
            elif inspect.isfunction(value):
                out.append((owner, name, {"kind": "method", "params": _params(value, True)}))
            else:
                out.append((owner, name, {"kind": "value", "value": value}))
    for owner, names in FAKE_INSTANCE_ATTRS.items():
        out += [(owner, n, {"kind": "instance"}) for n in names]
    return out


def check_fakes(desc: dict) -> List[Tuple[str, str, str, str]]:
    """(what, owner, member, detail) for every difference between the fakes and the real bindings."""
    problems = []
    for owner, member, fake in fake_api():
        r = real_member(desc, owner, member)
        if r is None:
            problems.append(("missing", owner, member, ""))
            continue
        fk, rk = fake["kind"], r["kind"]
        if fk == "enum":
            if rk != "enum":
                problems.append(("kind", owner, member, f"fake enum, real {rk}"))
                continue
            for k, v in fake["members"].items():
                if k not in r["members"]:
                    problems.append(("missing", member, k, ""))
                elif r["members"][k] != v:
                    problems.append(("value", member, k, f"fake {v}, real {r['members'][k]}"))
        elif fk in ("class", "function", "method"):
            if rk not in (("class",) if fk == "class" else ("function", "static") if fk == "function" else ("method",)):
                problems.append(("kind", owner, member, f"fake {fk}, real {rk}"))
                continue
            sigs = [parse_signature(s) for s in r.get("signatures", [])]
            want = fake["params"]
            if not any([n for n, _ in s] == [n for n, _ in want] and all(rd or not fd for (_, rd), (_, fd)
                                                                          in zip(s, want)) for s in sigs):
                problems.append(("params", owner, member, f"fake {want}, real {r.get('signatures')}"))
        elif fk == "property":
            if rk != "property" or (fake["settable"] and not r.get("settable")):
                problems.append(("kind", owner, member, f"fake property, real {rk}"))
        elif fk == "value" and "value" in fake and rk == "member" and int(fake["value"]) != r["value"]:
            problems.append(("value", owner, member, f"fake {fake['value']}, real {r['value']}"))
    return problems


def owners_needed() -> List[str]:
    """Every owner the checks look at (what dump.py must describe)."""
    owners = set(compat.TRT_API) | set(fake_classes()) | set(FAKE_INSTANCE_ATTRS)
    owners |= {name for o, name, d in fake_api() if o == MODULE and d["kind"] == "enum"}
    return sorted(owners)
