"""The stages' import graph, read from the source: engine/ never imports export/ (so no cycle
between them), no module imports another stage's private `_name`, no argparse namespace goes
below the CLI layer (only top-level sdrt/ imports argparse), and no import runs back up: a
top-level sdrt/ module that engine/ or export/ imports (contract, manifest, errors, ...) imports no
stage."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"sdrt": "sdrt", "engine": "sdrt.engine", "export": "sdrt.export", "benchmarks": "sdrt.benchmarks"}


def sources() -> dict[str, str]:
    """{module name: source} of every sdrt module."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path.read_text()
    return out


def stage(module: str) -> str:
    """sdrt.engine.x -> engine; sdrt.x (the CLI layer and the shared contract) -> sdrt."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("engine", "export", "benchmarks") else "sdrt"


def imports(source: str) -> list[tuple[str, str | None, str]]:
    """(module, imported name or None, local alias) for every import, at any depth."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, None, a.asname or a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.module, a.name, a.asname or a.name) for a in node.names]
    return out


def violations(modules: dict[str, str]) -> list[str]:
    found = []
    for name, source in modules.items():
        here = stage(name)
        other_modules = {}   # local alias -> module of another stage
        for mod, item, alias in imports(source):
            target = f"{mod}.{item}" if item and f"{mod}.{item}" in modules else mod
            if not target.startswith("sdrt"):
                if here in ("engine", "export", "benchmarks") and mod == "argparse":
                    found.append(f"{name} imports argparse (below the CLI layer)")
                continue
            there = stage(target)
            if here == "engine" and there in ("export", "benchmarks"):
                found.append(f"{name} imports {target} (the runtime never imports {there}/)")
            if there != here and item and item.startswith("_") and not item.startswith("__"):
                found.append(f"{name} imports {mod}.{item}, private to {there}")
            if there != here and target in modules:
                other_modules[alias] = target
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in other_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{name} uses {other_modules[node.value.id]}.{node.attr}, private to "
                             f"{stage(other_modules[node.value.id])}")
    return found + back_up(modules)


def sdrt_imports(modules: dict[str, str], name: str) -> set[str]:
    """The sdrt modules `name` imports (a module's own name, or the package it imports from)."""
    return {f"{mod}.{item}" if item and f"{mod}.{item}" in modules else mod
            for mod, item, _ in imports(modules[name]) if mod.startswith("sdrt")}


def back_up(modules: dict[str, str]) -> list[str]:
    """Top-level modules the runtime or the exporter import must not import a stage themselves."""
    found = []
    for name in sorted(modules):
        if stage(name) not in ("engine", "export"):
            continue
        for shared in sorted(t for t in sdrt_imports(modules, name) if stage(t) == "sdrt" and t in modules):
            for target in sorted(sdrt_imports(modules, shared)):
                if stage(target) != "sdrt":
                    found.append(f"{shared} imports {target}, and {name} imports {shared}: an import "
                                 f"that runs back up")
    return found


def test_stages_import_public_names_only_and_engine_never_imports_export():
    modules = sources()
    assert {"sdrt.engine.engine_keys", "sdrt.engine.tensorrt", "sdrt.export.build", "sdrt.cli"} <= set(modules)
    assert violations(modules) == []


def test_the_check_sees_each_kind_of_violation():
    bad = {
        "sdrt.engine.a": "from sdrt.export import b\nimport argparse\n",
        "sdrt.export.b": "from sdrt.engine.a import _private\nfrom sdrt.engine import a\na._helper()\n",
        "sdrt.engine.c": "def f():\n    from sdrt.export.b import thing\n",
    }
    found = violations(bad)
    assert "sdrt.engine.a imports sdrt.export.b (the runtime never imports export/)" in found
    assert "sdrt.engine.a imports argparse (below the CLI layer)" in found
    assert "sdrt.export.b imports sdrt.engine.a._private, private to engine" in found
    assert "sdrt.export.b uses sdrt.engine.a._helper, private to engine" in found
    assert "sdrt.engine.c imports sdrt.export.b (the runtime never imports export/)" in found


def test_the_check_sees_an_import_that_runs_back_up():
    bad = {"sdrt.engine.a": "from sdrt import shared\n", "sdrt.shared": "from sdrt.engine import cuda\n",
           "sdrt.engine.cuda": "", "sdrt.export.b": "from sdrt.contract import Model\n",
           "sdrt.contract": "from sdrt.errors import UserError\n", "sdrt.errors": "",
           "sdrt.cli": "from sdrt.engine import a\n"}          # the CLI layer may import any stage
    assert violations(bad) == ["sdrt.shared imports sdrt.engine.cuda, and sdrt.engine.a imports sdrt.shared: "
                               "an import that runs back up"]
