"""What sdrt's own source uses of tensorrt / tensorrt_rtx, cuda.bindings.runtime and onnxruntime,
collected from the code (AST), and checked against the real installed modules.

    uses(family) -> [Use]                  every attribute, method call, positional count and keyword
    check(family, module) -> Report        problems (missing / wrong call) and guarded absences

A use is found by typing expressions the way a reader does:
  - module roots: `trt` / `self.trt` (tensorrt family), `ort` / `self.ort` / `onnxruntime`,
    `rt()` / `cuda.rt()` (cuda.bindings.runtime);
  - `x = root.Class(...)` makes x an instance of Class; `y = x.method(...)` takes the method's
    return type from its signature (pybind11 docstring "-> ...", or a Python annotation);
  - `self.a = <typed>` types self.a in every method of the class;
  - function parameters are typed by name (SEEDS below), since nothing else says what they hold.
An attribute looked up on a typed value must exist; a call's keyword names must be parameters and
its positional count must fit (pybind11 docstring signatures, Cython signatures, inspect). Names
tested with hasattr(obj, "name") / getattr(obj, "name", default) in the same file are "guarded":
their absence is reported, not a failure (the code handles both versions).
"""
from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("engine/*.py"), *ROOT.glob("export/*.py"), *ROOT.glob("sdrt/*.py"),
                  *ROOT.glob("benchmarks/*.py")])

FAMILIES = {
    "tensorrt": {"names": {"trt"}, "self": {"trt"}, "calls": set(),
                 "seeds": {"engine": "ICudaEngine", "eng": "ICudaEngine", "context": "IExecutionContext",
                           "builder": "Builder", "network": "INetworkDefinition", "config": "IBuilderConfig",
                           "parser": "OnnxParser", "runtime": "Runtime"}},
    "onnxruntime": {"names": {"ort", "onnxruntime"}, "self": {"ort"}, "calls": set(),
                    "seeds": {"sess": "InferenceSession", "io": "IOBinding"}},
    "cuda": {"names": set(), "self": set(), "calls": {"rt", "cuda.rt"},
             "seeds": {"prop": "cudaDeviceProp"}},
}


@dataclass
class Use:
    file: str
    line: int
    expr: str
    problem: str | None = None
    guarded: bool = False


@dataclass
class Report:
    checked: list = field(default_factory=list)      # [Use] that resolved and fit
    problems: list = field(default_factory=list)     # [Use] with .problem, not guarded
    guarded_absent: list = field(default_factory=list)
    guarded: list = field(default_factory=list)      # every guarded use, present or not


MISSING = object()


@dataclass(frozen=True)
class Instance:
    """An instance of `cls` (the class itself is typed as the class object)."""
    cls: object


def lookup(base, attr: str):
    """getattr on the module, class or instance type; MISSING when absent."""
    return getattr(base.cls if isinstance(base, Instance) else base, attr, MISSING)


def is_data(obj) -> bool:
    """A property / field: its value's type is not known from the class."""
    return inspect.isdatadescriptor(obj) or inspect.isgetsetdescriptor(obj) or inspect.ismemberdescriptor(obj)


GUARD = re.compile(r"\b(hasattr|getattr|major_minor)\(|__version__")


def version_guarded(node, parents) -> bool:
    """Inside an if / conditional whose test asks hasattr/getattr or compares versions, or after
    such an if that returns (the fallback of an early return)."""
    while node in parents:
        child, node = node, parents[node]
        if isinstance(node, (ast.If, ast.IfExp)) and GUARD.search(ast.unparse(node.test)):
            return True
        for stmt in getattr(node, "body", []) if isinstance(getattr(node, "body", None), list) else []:
            if stmt is child:
                break
            if (isinstance(stmt, ast.If) and GUARD.search(ast.unparse(stmt.test))
                    and isinstance(stmt.body[-1], (ast.Return, ast.Raise))):
                return True
    return False


def guarded_names(tree) -> set[str]:
    """"name" of every hasattr(x, "name") and getattr(x, "name", default) in the file."""
    out = set()
    for n in ast.walk(tree):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")
                and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)):
            if n.func.id == "hasattr" or len(n.args) == 3:
                out.add(n.args[1].value)
    return out


# ---- signatures ------------------------------------------------------------------------------------

def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur.strip() else parts


def doc_signatures(obj, name: str) -> list[tuple[list[str], int, str | None]]:
    """[(parameter names, required count, return type name)] from pybind11 docstring lines
    `name(self: T, a: int, b: int = 0) -> R` (every overload)."""
    out = []
    for m in re.finditer(rf"^\s*(?:\d+\.\s*)?{re.escape(name)}\((.*)\)(?:\s*->\s*([\w.]+))?\s*$",
                         inspect.getdoc(obj) or "", re.M):
        params = [p.strip() for p in _split_top(m.group(1)) if p.strip() and p.strip() not in ("*", "/")]
        names = [p.split(":")[0].split("=")[0].split()[-1] for p in params]  # "size_t count" -> count
        if names[:1] == ["*args"]:
            continue
        required = sum("=" not in p for p in params)
        out.append((names, required, m.group(2)))
    return out


def signatures(obj, name: str, bound: bool) -> list[tuple[list[str], int, str | None]] | None:
    """Every way `obj` may be called: [(names, required, return)], `self` dropped when bound;
    None when nothing can be read."""
    sigs = doc_signatures(obj, "__init__" if inspect.isclass(obj) else name)
    if inspect.isclass(obj) and sigs:
        bound = True
    if not sigs:
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return None
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            return None
        names = list(sig.parameters)
        required = sum(p.default is p.empty for p in sig.parameters.values())
        ret = sig.return_annotation
        sigs = [(names, required, ret if isinstance(ret, str) else getattr(ret, "__name__", None))]
        bound = bound and names[:1] == ["self"]   # a bound method's signature has no self
    if bound:
        sigs = [(n[1:], max(r - 1, 0), ret) if n[:1] == ["self"] else (n, r, ret) for n, r, ret in sigs]
    return sigs


def call_problem(sigs, nargs: int | None, kwargs: list[str]) -> str | None:
    """None when one signature takes `nargs` positional arguments and these keywords."""
    why = []
    for names, required, _ in sigs:
        if nargs is not None and nargs > len(names):
            why.append(f"takes at most {len(names)} positional, given {nargs}")
            continue
        bad = [k for k in kwargs if k not in names[nargs or 0:]]
        if bad:
            why.append(f"no keyword {', '.join(bad)} (parameters: {', '.join(names)})")
            continue
        if nargs is not None and nargs + len(kwargs) < required:
            why.append(f"needs {required} arguments, given {nargs + len(kwargs)}")
            continue
        return None
    return "; ".join(why)


# ---- typing expressions ----------------------------------------------------------------------------

class Typer:
    """Types of expressions within one function: the module, a class (for its instances) or None."""

    def __init__(self, family: dict, module, class_attrs: dict):
        self.family, self.module, self.class_attrs, self.env = family, module, class_attrs, {}
        self.annotated: set[str] = set()

    def seed(self, name: str):
        """A name typed by what it is called (SEEDS), unless it is a parameter annotated with
        another type (sdrt's own classes)."""
        path = self.family["seeds"].get(name) if name not in self.annotated else None
        cls = getattr(self.module, path, None) if path else None
        return Instance(cls) if cls is not None else None

    def type_of(self, node):
        if isinstance(node, ast.Name):
            if node.id in self.env:
                return self.env[node.id]
            return self.module if node.id in self.family["names"] else self.seed(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                if node.attr in self.family["self"]:
                    return self.module
                return self.class_attrs.get(node.attr)
            base = self.type_of(node.value)
            if base is None:
                return None
            got = lookup(base, node.attr)
            return None if got is MISSING or (not inspect.ismodule(base) and is_data(got)) else got
        if isinstance(node, ast.Call):
            if ast.unparse(node.func) in self.family["calls"]:
                return self.module
            f = self.type_of(node.func)
            if f is None or isinstance(f, Instance):
                return None
            if inspect.isclass(f):
                return Instance(f)
            sigs = signatures(f, getattr(node.func, "attr", ""), bound=True) or []
            for _, _, ret in sigs:
                cls = getattr(self.module, ret.rsplit(".", 1)[-1], None) if ret else None
                if inspect.isclass(cls):
                    return Instance(cls)
        return None

    def assign(self, target, value) -> None:
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            for t, v in zip(target.elts, value.elts):
                self.assign(t, v)
        elif isinstance(target, ast.Name):
            t = self.type_of(value)
            if t is not None:
                self.env[target.id] = t


def functions(tree):
    """(function node, enclosing class node or None) for every function in the file."""
    out = []
    def visit(node, cls):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, child)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((child, cls))
                visit(child, cls)
            else:
                visit(child, cls)
    visit(tree, None)
    return out


def typed_function(fn, family, module, class_attrs) -> Typer:
    typer = Typer(family, module, class_attrs)
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = fn.args
        typer.annotated = {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.annotation is not None}
    assigns = sorted((n for n in ast.walk(fn) if isinstance(n, ast.Assign)), key=lambda n: (n.lineno, n.col_offset))
    for a in assigns:
        for t in a.targets:
            typer.assign(t, a.value)
    return typer


def class_attributes(tree, family, module) -> dict:
    """{class name: {attr: type}} from `self.attr = <typed expression>` in its methods."""
    out = {}
    for fn, cls in functions(tree):
        if cls is None:
            continue
        typer = typed_function(fn, family, module, {})
        attrs = out.setdefault(cls.name, {})
        for a in (n for n in ast.walk(fn) if isinstance(n, ast.Assign)):
            pairs = []
            for t in a.targets:
                if isinstance(t, ast.Tuple) and isinstance(a.value, ast.Tuple):
                    pairs += zip(t.elts, a.value.elts)
                else:
                    pairs.append((t, a.value))
            for t, v in pairs:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    ty = typer.type_of(v)
                    if ty is not None:
                        attrs[t.attr] = ty
    return out


# ---- collecting and checking -----------------------------------------------------------------------

def check(family_name: str, module, sources=SOURCES) -> Report:
    family, report = FAMILIES[family_name], Report()
    seen = set()
    for path in sources:
        tree = ast.parse(Path(path).read_text())
        if not uses_family(tree, family):
            continue
        guarded = guarded_names(tree)
        cls_attrs = class_attributes(tree, family, module)
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for fn, cls in [(tree, None)] + functions(tree):
            typer = typed_function(fn, family, module, cls_attrs.get(cls.name, {}) if cls else {})
            body = fn.body if fn is not tree else [n for n in tree.body
                                                   if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
            for stmt in body:
                for node in ast.walk(stmt):
                    if not isinstance(node, ast.Attribute):
                        continue
                    base = typer.type_of(node.value)
                    if base is None or (isinstance(node.value, ast.Name) and node.value.id == "self"):
                        continue
                    key = (str(path), node.lineno, node.col_offset)
                    if key in seen:
                        continue
                    seen.add(key)
                    use = Use(str(Path(path).relative_to(ROOT)), node.lineno, ast.unparse(node),
                              guarded=node.attr in guarded or version_guarded(node, parents))
                    got = lookup(base, node.attr)
                    if got is MISSING:
                        use.problem = f"{_name(base)} has no attribute {node.attr!r}"
                    else:
                        call = parents.get(node)
                        if isinstance(call, ast.Call) and call.func is node and callable(got):
                            sigs = signatures(got, node.attr, bound=isinstance(base, Instance))
                            if sigs:
                                star = any(isinstance(a, ast.Starred) for a in call.args)
                                nargs = None if star else len(call.args)
                                kws = [k.arg for k in call.keywords if k.arg]
                                if (p := call_problem(sigs, nargs, kws)) is not None:
                                    use.problem = f"{_name(base)}.{node.attr}: {p}"
                    if use.guarded:
                        report.guarded.append(use)
                    if use.problem is None:
                        report.checked.append(use)
                    elif use.guarded:
                        report.guarded_absent.append(use)
                    else:
                        report.problems.append(use)
    return report


def _name(obj) -> str:
    obj = obj.cls if isinstance(obj, Instance) else obj
    return getattr(obj, "__name__", type(obj).__name__)


def uses_family(tree, family: dict) -> bool:
    """Whether the file names one of the family's module roots at all."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and n.id in family["names"]:
            return True
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self" \
                and n.attr in family["self"]:
            return True
        if isinstance(n, ast.Call) and ast.unparse(n.func) in family["calls"]:
            return True
    return False


# ---- string keys: provider options and run config entries ------------------------------------------

def provider_option_keys(sources=SOURCES) -> set[str]:
    """String keys of dicts built in functions named *provider_options* (and `opts["k"] = ...`)."""
    keys = set()
    for path in sources:
        for fn, _ in functions(ast.parse(Path(path).read_text())):
            if "provider_options" not in fn.name:
                continue
            for n in ast.walk(fn):
                if isinstance(n, ast.Dict):
                    keys |= {k.value for k in n.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store) and isinstance(n.slice, ast.Constant):
                    keys.add(n.slice.value)
    return keys


def run_config_keys(sources=SOURCES) -> set[str]:
    """First argument of every add_run_config_entry("key", ...) call."""
    keys = set()
    for path in sources:
        for n in ast.walk(ast.parse(Path(path).read_text())):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "add_run_config_entry"
                    and n.args and isinstance(n.args[0], ast.Constant)):
                keys.add(n.args[0].value)
    return keys
