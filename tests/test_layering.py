"""The layering of imnet, read off its imports (lazy ones inside functions too): no cycles, no
private names used across modules, lower layers never import higher ones, and the Triton internals
are touched in one place."""

import ast
import graphlib
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted((ROOT / "imnet").rglob("*.py"))}

# A module -> the imnet modules it may import (prefixes); modules not named here may import any.
ALLOWED = {
    "imnet.arch": (), "imnet.atomic": (), "imnet.dtypes": (), "imnet.schedule": (), "imnet.dist": (),
    "imnet.config": ("imnet.arch",),                       # validating a YAML builds no model
    "imnet.kernels": ("imnet.kernels", "imnet.arch", "imnet.dtypes"),   # kernels know no models
    "imnet.data": ("imnet.data", "imnet.config", "imnet.atomic"),
}
TRITON_INTERNALS = ("triton.compiler", "triton.runtime", "triton.backends", "triton.knobs")
# the fast path, and precompile's dry-run driver (Triton's driver interface, for compiling without a GPU)
ON_TRITON_INTERNALS = {"imnet.kernels.gn.launch", "imnet.kernels.precompile"}


def _imports(path: pathlib.Path):
    """(imported module, name or None) for every import statement of the file, and the module aliases."""
    out, aliases = [], {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                out.append((node.module, a.name))
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, None))
                if a.asname and a.name in MODULES:
                    aliases[a.asname] = a.name
    return out, aliases


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for module, imported in _imports(path)[0]:
            if module.split(".")[0] == "imnet":
                sub = f"{module}.{imported}"
                deps.add(sub if sub in MODULES else module)
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles():
    tuple(graphlib.TopologicalSorter(_graph()).static_order())  # CycleError names the cycle


def test_lower_layers_import_only_what_they_may():
    for name, deps in _graph().items():
        rule = max((k for k in ALLOWED if name == k or name.startswith(k + ".")), key=len, default=None)
        if rule is None:
            continue
        for dep in deps:
            assert dep.startswith(ALLOWED[rule]), f"{name} imports {dep} (allowed: {ALLOWED[rule] or 'nothing'})"


def test_no_private_names_across_modules():
    for name, path in [*MODULES.items(), *((p.stem, p) for p in (ROOT / "launch").glob("*.py"))]:
        imports, aliases = _imports(path)
        for module, imported in imports:
            if module.startswith("imnet") and imported:
                assert not imported.startswith("_"), f"{name} imports {module}.{imported}"
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                raise AssertionError(f"{name} uses {aliases[node.value.id]}.{node.attr}")


def test_triton_internals_are_touched_in_one_place():
    for name, path in MODULES.items():
        imports, _ = _imports(path)
        internal = [m for m, n in imports
                    if m.startswith(TRITON_INTERNALS) or (m == "triton" and n == "knobs")]
        assert not internal or name in ON_TRITON_INTERNALS, f"{name} imports {internal}"
        if name not in ON_TRITON_INTERNALS:
            assert "tl.standard" not in path.read_text(), name


def test_the_checks_see_a_violation(tmp_path, monkeypatch):
    """Negative control: a kernels module that imports models, or a private name, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from imnet.models import build\nfrom imnet.checkpoint import _os_error\n")
    monkeypatch.setitem(MODULES, "imnet.kernels.bad", bad)
    for check in (test_lower_layers_import_only_what_they_may, test_no_private_names_across_modules):
        try:
            check()
        except AssertionError as e:
            assert "imnet.kernels.bad" in str(e)
        else:
            raise AssertionError(f"{check.__name__} missed the bad module")
