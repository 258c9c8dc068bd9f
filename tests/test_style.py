"""Code-shape rules from ../shared/STYLE.md that a test can check."""

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "napari_coordgate"
MAX_FUNCTION_LINES = 80


def _long_functions():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - first + 1
                if length > MAX_FUNCTION_LINES:
                    yield f"{path.relative_to(SRC.parents[1])}:{node.lineno} {node.name} ({length} lines)"


def test_no_function_in_src_is_longer_than_80_lines():
    offenders = list(_long_functions())
    assert not offenders, "functions longer than 80 lines (split them):\n" + "\n".join(offenders)
