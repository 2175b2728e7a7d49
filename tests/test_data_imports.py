"""hf_lpft/data has no import circle, counting imports inside functions (which hide circles from Python)."""

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "hf_lpft" / "data"


def _imports(path: Path) -> set[str]:
    """Modules of hf_lpft.data that ``path`` imports anywhere (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n.rsplit(".", 1)[-1] for n in names if n.startswith("hf_lpft.data.")}


def test_no_import_circle_in_data():
    modules = {p.stem for p in DATA.glob("*.py")} - {"__init__"}
    graph = {m: _imports(DATA / f"{m}.py") & modules - {m} for m in modules}
    assert graph["builtin"] >= {"shift_builtin"} and graph["stats"] == {"images"}  # the graph is really read
    assert graph["images"] == set()  # decoding images sits below federate, load and stats
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join(path + (module,))}"
        if module not in done:
            for dep in sorted(graph[module]):
                visit(dep, path + (module,))
            done.add(module)

    for module in sorted(modules):
        visit(module, ())
