"""The package's layers: a module imports only from its own or lower layers, and there is no import cycle.

Every import counts, function-local ones included (they used to hide a cycle). Only the CLI imports lazily
(inside its commands, so `emlens --help` starts fast); library modules import emlens at the top.
"""

import ast
from pathlib import Path

import emlens

PACKAGE = Path(emlens.__file__).parent
LAYERS = {  # top-level module or subpackage of emlens -> layer (DESIGN.md, "Layers inside src/emlens/")
    "base": 1,
    "model": 2, "attention": 2, "sites": 2, "runs": 2, "data": 2,
    "generation": 3,
    "capture": 4, "steering": 4, "judges": 4,
    "directions": 5, "evaluation": 5, "sae": 5,
    "analysis": 6, "training": 6, "study": 6, "serve": 6,
    "cli": 7, "bench": 7,
    "__init__": 8, "__main__": 8,  # the front door imports lazily from every layer
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def emlens_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported emlens module, line, imported inside a function)."""
    tree = ast.parse(path.read_text())
    local = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("emlens"):
            for alias in node.names:  # `from emlens.x import y` may import the submodule emlens.x.y
                sub = f"{node.module}.{alias.name}"
                target = sub if _is_module(sub) else node.module
                found.append((target, node.lineno, id(node) in local))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in local) for a in node.names if a.name.startswith("emlens")]
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {module_name(p): emlens_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    for module in graph():
        assert module == "emlens" or module.split(".")[1] in LAYERS, f"{module}: add it to a layer"


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)}) at line {line}"
              for module, imports in graph().items() for target, line, _ in imports
              if layer_of(target) > layer_of(module)]
    assert not upward, "\n".join(upward)


def test_library_modules_import_emlens_at_the_top():
    hidden = [f"{module} line {line}: imports {target} inside a function"
              for module, imports in graph().items() if layer_of(module) < LAYERS["cli"]
              for target, line, is_local in imports if is_local]
    assert not hidden, "\n".join(hidden)


def test_no_import_cycle():
    edges = {module: {t for t, _, _ in imports if t != module and t != "emlens"} for module, imports in graph().items()
             if module != "emlens"}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return path + [module, target]
            if state.get(target) is None:
                cycle = visit(target, path + [module])
                if cycle:
                    return cycle
        state[module] = 2
        return None

    for module in sorted(edges):
        if state.get(module) is None:
            cycle = visit(module, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_the_checks_catch_an_upward_import(tmp_path):
    """The layer check is not vacuous: an evaluation module importing the CLI is reported."""
    fake = PACKAGE / "evaluation" / "_fake_upward.py"
    fake.write_text("from emlens.cli.app import app\n")
    try:
        upward = [t for t, _, _ in graph()["emlens.evaluation._fake_upward"] if layer_of(t) > LAYERS["evaluation"]]
        assert upward == ["emlens.cli.app"]
    finally:
        fake.unlink()
