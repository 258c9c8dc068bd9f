"""The shape of the house (../shared/STYLE.md): packages by role in layers, each importing only from the layers
below it (function-level imports count; ``if TYPE_CHECKING:`` imports do not), no import circle, Qt only in
``_widgets``, and a package import that pulls in neither torch nor Qt."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"
PKG = "napari_coordgate"

#: the layer of each top-level module or package of napari_coordgate (base 0 ... front-ends 9); a module may
#: import from its own top-level unit and from units of a strictly lower layer, nothing else
LAYERS = {
    "_version": 0, "config": 0, "coords": 0, "devices": 0, "checks": 0, "outputs": 0,
    "optics": 1, "nn": 1,
    "data": 2, "metrics": 2,
    "report": 3, "calibration": 3,
    "model_io": 4, "image_io": 4,
    "engine": 5,
    "runners": 6, "samples": 6,
    "app": 7,
    "demo": 8,
    "cli": 9, "_widgets": 9,
    "__init__": 10,  # the lazy facade
}
QT = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "napari.qt", "superqt")


def _modules():
    for path in sorted((SRC / PKG).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        yield path, parts


def _type_checking_lines(tree) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for inner in node.body:
                lines.update(range(inner.lineno, inner.end_lineno + 1))
    return lines


def _imports(path: Path, parts: tuple[str, ...]):
    """(line, absolute module name) of every import in the file, function-level ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = _type_checking_lines(tree)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = package[:-1] if package[-1] == "__init__" else package
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            submodules = [f"{mod}.{a.name}" for a in node.names if _existing(f"{mod}.{a.name}")]
            if len(submodules) == len(node.names):  # `from . import config`: the modules are what is imported
                for sub in submodules:
                    yield node.lineno, sub
            else:
                yield node.lineno, mod


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PKG:
        return None
    return "__init__" if len(parts) == 1 else parts[1]


def _existing(module: str) -> bool:
    rel = Path(*module.split("."))
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def test_every_module_has_a_layer():
    units = {parts[1] if len(parts) > 2 else parts[1] for _, parts in _modules()}
    assert units <= set(LAYERS), f"add these to LAYERS (and STYLE.md's picture): {sorted(units - set(LAYERS))}"


def test_no_module_imports_from_a_higher_layer_or_a_sibling_unit():
    bad = []
    for path, parts in _modules():
        mine = _unit(".".join(parts))
        for line, mod in _imports(path, parts):
            theirs = _unit(mod)
            if theirs is None or theirs == mine or not _existing(mod):
                continue
            if LAYERS[theirs] >= LAYERS[mine]:
                bad.append(f"{path.relative_to(SRC)}:{line} ({mine}, layer {LAYERS[mine]}) imports {mod} "
                           f"({theirs}, layer {LAYERS[theirs]})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_there_is_no_import_circle_between_modules():
    graph: dict[str, set[str]] = {}
    for path, parts in _modules():
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = {m for _, m in _imports(path, parts) if m.startswith(PKG) and _existing(m) and m != name}
    # a package's __init__ re-exporting its own modules is no circle: drop edges from a package to its children
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not d.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_only_the_widgets_import_qt():
    bad = [f"{path.relative_to(SRC)}:{line} imports {mod}"
           for path, parts in _modules() if parts[1] != "_widgets"
           for line, mod in _imports(path, parts) if mod.startswith(QT)]
    assert not bad, "Qt outside _widgets:\n" + "\n".join(bad)


def test_importing_the_package_loads_neither_torch_nor_qt():
    code = ("import sys, napari_coordgate as cg; cg.__all__; dir(cg); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'PyQt6', 'PyQt5', 'qtpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_name_of_the_facade_resolves_to_what_its_module_defines():
    import importlib

    import napari_coordgate as cg

    for name in cg.__all__:
        value = getattr(cg, name)
        if name != "__version__":
            assert value is getattr(importlib.import_module(value.__module__), name), name
