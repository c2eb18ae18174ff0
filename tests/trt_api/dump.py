"""Describe NVIDIA's real TensorRT Python bindings as JSON (run by tests/trt_api/bindings.py in a subprocess whose
PYTHONPATH holds an unpacked `tensorrt-cuNN-bindings` wheel and whose LD_LIBRARY_PATH holds stub libnvinfer/
libnvinfer_plugin/libnvonnxparser libraries: the extension imports, nothing of TensorRT runs).

    python dump.py OWNER [OWNER ...]   ->   {"version": ..., "owners": {OWNER: {...}}}

OWNER "tensorrt" is the module, any other name a class of it. Per member: kind ("class", "enum", "function",
"method", "property" (+ settable), "member" (enum member, + value), "value"), and for callables the signatures of
every overload as pybind11 writes them into the docstring."""
import inspect
import json
import re
import sys

import tensorrt_bindings as trt


def signatures(obj, name):
    doc = getattr(obj, "__doc__", None) or ""
    pat = re.compile(rf"^\s*(?:\d+\.\s+)?{re.escape(name)}\((.*)\)\s*->", re.M)
    return [m.group(1) for m in pat.finditer(doc) if "*args" not in m.group(1)]


def is_enum_type(t) -> bool:
    return isinstance(t, type) and isinstance(getattr(t, "__members__", None), dict)


def describe(owner_obj, name, static):
    value = getattr(owner_obj, name, None)
    if isinstance(static, property):
        return {"kind": "property", "settable": static.fset is not None}
    if isinstance(static, staticmethod) or type(static).__name__ in ("instancemethod", "function",
                                                                     "builtin_function_or_method", "method"):
        kind = "static" if isinstance(static, staticmethod) else "method"
        if inspect.ismodule(owner_obj):
            kind = "function"
        return {"kind": kind, "signatures": signatures(value, name)}
    if isinstance(value, type):
        if is_enum_type(value):
            return {"kind": "enum", "members": {k: int(v) for k, v in value.__members__.items()}}
        return {"kind": "class", "signatures": signatures(value.__init__, "__init__")}
    if is_enum_type(type(value)):
        return {"kind": "member", "value": int(value), "type": type(value).__qualname__}
    return {"kind": "value", "type": type(value).__name__}


def dump_owner(owner):
    if owner == "tensorrt":
        obj = trt
    else:
        obj = getattr(trt, owner, None)
        if obj is None:
            return None
    names = [n for n in dir(obj) if not n.startswith("_")] + ["__version__", "__init__"]
    out = {}
    for n in names:
        if not hasattr(obj, n):
            continue
        try:
            static = inspect.getattr_static(obj, n)
        except AttributeError:
            static = None
        out[n] = describe(obj, n, static)
    return out


def main(owners):
    print(json.dumps({"version": trt.__version__, "file": trt.tensorrt.__file__,
                      "owners": {o: dump_owner(o) for o in owners}}))


if __name__ == "__main__":
    main(sys.argv[1:])
