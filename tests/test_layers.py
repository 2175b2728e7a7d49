"""The package's shape: layers import only upward-listed layers, no import circles, short functions.

The import graph is read with ``ast`` from every module of hf_lpft/, function-level imports included (a
circle hidden inside a function is still a circle). Layers, from the top (each may import only its own
layer and those listed before it), follow ../shared/DESIGN.md:

    base (io, _faults, spec, registry) > data.schemes, data.shifts > config > speed, layout, checkpoint > data >
    models > train > strategies > federated > evaluation > hub > run > pipeline > drivers (studies, flower_app, cli)

Three places differ from the blueprint, on purpose: ``data.schemes`` (the partition-scheme registry) and
``data.shifts`` (the shift registry, corruption families, severities) sit above ``config``, which checks
``data.scheme``, its options and the shift settings against the registries and vocabularies they own;
``studies`` sit below ``pipeline`` (a sweep runs the pipeline once per point), and the Flower App is a driver
(it runs the study over a Flower Grid).
``hf_lpft/__init__.py`` is left out: it only re-exports ``load_personalized`` / ``predict`` lazily and holds
``__version__``.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hf_lpft"
LAYERS = [
    ("hf_lpft.io", "hf_lpft._faults", "hf_lpft.spec", "hf_lpft.registry", "hf_lpft.errors"),
    ("hf_lpft.data.schemes", "hf_lpft.data.shifts"),
    ("hf_lpft.config",),
    ("hf_lpft.speed", "hf_lpft.layout", "hf_lpft.checkpoint"),
    ("hf_lpft.data",),
    ("hf_lpft.models",),
    ("hf_lpft.train",),
    ("hf_lpft.strategies", "hf_lpft.algorithms"),
    ("hf_lpft.federated",),
    ("hf_lpft.evaluation",),
    ("hf_lpft.hub",),
    ("hf_lpft.run",),
    ("hf_lpft.pipeline",),
    ("hf_lpft.studies", "hf_lpft.flower_app", "hf_lpft.cli"),
]
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    found.pop("hf_lpft")  # the lazy facade (module docstring)
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every hf_lpft module ``path`` imports, anywhere in the file (``from a import b``: ``a.b`` when a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("hf_lpft")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hf_lpft"):
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                    for a in node.names}
    return {m for m in out if m in known}  # `from hf_lpft import __version__` names the facade: not an edge


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the import circles."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_function_level_imports_and_circles():
    known = {"hf_lpft.a", "hf_lpft.b", "hf_lpft.b.c"}
    source = "def f():\n    from hf_lpft.b import c\n    import hf_lpft.a\n"
    path = Path(__file__).with_name("_layers_probe.py")
    path.write_text(source)
    try:
        assert imports_of(path, known) == {"hf_lpft.b.c", "hf_lpft.a"}
    finally:
        path.unlink()
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("hf_lpft.federated.fedavg") > layer_of("hf_lpft.train.loop") > layer_of("hf_lpft.config")


def upward_imports() -> list[str]:
    return [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
            for m, targets in graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]


def test_every_module_has_a_layer_and_no_import_goes_upward():
    upward = [u for u in upward_imports() if not u.startswith("hf_lpft.data.")]
    assert not upward, "\n".join(upward)


def test_data_imports_nothing_below_it():
    assert not [u for u in upward_imports() if u.startswith("hf_lpft.data.")]


def test_federated_takes_explicit_arguments_not_the_run_config():
    direct = {m: t & {"hf_lpft.config", "hf_lpft.pipeline"} for m, t in graph().items()
              if m.startswith("hf_lpft.federated")}
    assert not any(direct.values()), direct


def test_lower_layers_take_objects_not_the_config():
    """evaluation/, layout, hub/ and data/ take small settings (EvalSettings, a RunLayout, the Hub section), built
    from the config in hf_lpft.run.settings; none of them imports hf_lpft.config (issue 24)."""
    lower = ("hf_lpft.evaluation", "hf_lpft.layout", "hf_lpft.hub", "hf_lpft.data")
    found = {m: sorted(t & {"hf_lpft.config"}) for m, t in graph().items()
             if any(m == p or m.startswith(p + ".") for p in lower)}
    assert {p for p in lower if any(m == p or m.startswith(p + ".") for m in found)} == set(lower)  # all seen
    assert not {m: t for m, t in found.items() if t}


def _circles(through_data: bool) -> list[list[str]]:
    return [c for c in cycles(graph()) if any(m.startswith("hf_lpft.data") for m in c) == through_data]


def test_no_import_circle():
    assert not _circles(through_data=False)


def test_no_import_circle_through_data():
    assert not _circles(through_data=True)


def long_functions(prefix: str = "") -> list[str]:
    out = []
    for module, path in modules().items():
        if not module.startswith(prefix):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}: {lines} lines")
    return out


def test_no_function_over_60_lines():
    assert not [f for f in long_functions() if not f.startswith("hf_lpft/data/")]


def test_no_function_over_60_lines_in_data():
    assert not long_functions("hf_lpft.data")


def test_the_driver_is_short():
    assert len((ROOT / "pipeline.py").read_text().splitlines()) < 200
