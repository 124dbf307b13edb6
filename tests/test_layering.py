"""The package's folders are its layers: a module imports only modules of lower layers, and nothing imports in a
cycle. Every import counts, also those inside functions (they are how heavy or optional modules are reached)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipdalle"

# Lowest first. A module may import a module of a lower layer, or of its own package (a folder is one unit, whose
# modules may use each other without cycles). `clip.py` is the public facade: nothing inside imports it.
LAYERS = [
    ["__init__", "io", "runtime", "config"],
    ["transforms"],
    ["data", "tokenizers"],
    ["models"],
    ["checkpoint"],
    ["convert", "hub"],
    ["pretrained"],
    ["backends"],
    ["zero_shot"],
    ["sampling", "guide", "evaluate", "prompts", "caption", "explain"],
    ["training", "index"],
    ["serve", "demo"],
    ["clip", "cli"],
    ["__main__"],
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """clipdalle.models.dalle -> models; clipdalle.io -> io; clipdalle -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """The clipdalle modules `path` imports (absolute names), at any depth of the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "clipdalle":
                continue
            for alias in node.names:  # `from . import checkpoint` names a module; `from .io import x` does not
                candidate = f"{target}.{alias.name}"
                found.add(candidate if module_exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "clipdalle")
    return found


def module_exists(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_unit_has_a_layer():
    units = {unit_of(name) for name in graph()}
    assert units <= set(RANK), f"add to LAYERS: {sorted(units - set(RANK))}"


def test_modules_import_only_lower_layers():
    wrong = []
    for module, imported in graph().items():
        for target in imported:
            source_unit, target_unit = unit_of(module), unit_of(target)
            if target_unit == "clip" and source_unit != "__init__":
                wrong.append(f"{module} imports the public facade {target}; import its home module instead")
            elif source_unit != target_unit and RANK[target_unit] >= RANK[source_unit]:
                wrong.append(f"{module} (layer {RANK[source_unit]}) imports {target} (layer {RANK[target_unit]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = {module: {target for target in imported if target != module} for module, imported in graph().items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target] if target in path else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_relative_and_nested_imports(tmp_path):
    found = imports_of(PACKAGE / "cli.py")
    assert "clipdalle.training" in found and "clipdalle.serve" in found  # imported inside functions
    assert "clipdalle.checkpoint" in imports_of(PACKAGE / "training" / "loop.py")  # `from .. import checkpoint`
