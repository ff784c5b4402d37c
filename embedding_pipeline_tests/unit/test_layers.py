"""The layer rules of docs/architecture.md, checked on the source: lower layers never import higher ones, the
components never import each other sideways, Dagster stays above the pipeline, and the package has no import cycle.

Every import counts, including those inside functions: a lazy import still ties the lower module to the higher one.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "embedding_pipeline"

# Lowest first. A module belongs to the longest prefix listed; every module must belong to one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("runtime", ("embedding_pipeline", "settings", "runtime", "orchestration.names")),
    ("components", ("sources", "preprocess", "storage", "serving", "index")),
    (
        "pipeline",
        (
            "ingest",
            "retrieval",
            "quality",
            "vectors",
            "retention",
            "thumbnails",
            "collection_setup",
            "duplicates",
            "export",
        ),
    ),
    # The instance and what it knows about drops: used by the definitions (an op reading its own instance).
    ("instance", ("orchestration.instance",)),
    ("defs", ("defs",)),
    ("orchestration", ("orchestration", "services")),
    ("surfaces", ("cli", "api", "bench", "pipeline_api")),
]
# The components in the order an image passes them: each may use the ones before it, never one after it, and
# serving and index never use each other.
COMPONENTS = ("sources", "preprocess", "storage", "serving", "index")
SIDEWAYS = {("serving", "index"), ("index", "serving")}
# Where the definitions are loaded to be executed, and where Dagster's private modules may be used.
LOADS_DEFINITIONS = {"embedding_pipeline.orchestration.runs"}
DAGSTER_PRIVATE = {"embedding_pipeline.orchestration.backfill"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The package module that ``name`` (a module or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported name, line) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import submodule`` depends on the submodule; ``from module import name`` on the module.
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _package_edges() -> dict[str, dict[str, int]]:
    edges: dict[str, dict[str, int]] = defaultdict(dict)
    for module, path in MODULES.items():
        for name, line in _imports(path):
            if name.split(".")[0] == "embedding_pipeline":
                target = _owner(name)
                if target and target != module:
                    edges[module].setdefault(target, line)
    return edges


EDGES = _package_edges()


def _short(module: str) -> str:
    return module.removeprefix("embedding_pipeline.") if module != "embedding_pipeline" else module


def layer_of(module: str) -> int:
    short = _short(module)
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if short == prefix or short.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank)
    if best is None:
        raise AssertionError(
            f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name} and to docs/architecture.md"
        )
    return best[1]


def _component(module: str) -> str | None:
    head = _short(module).split(".")[0]
    return head if head in COMPONENTS else None


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    wrong = [
        f"{_short(m)} ({LAYERS[layer_of(m)][0]}) imports {_short(t)} ({LAYERS[layer_of(t)][0]}) at line {line}"
        for m, targets in EDGES.items()
        for t, line in targets.items()
        if layer_of(t) > layer_of(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_components_follow_the_data_path_and_never_cross_sideways():
    wrong = []
    for module, targets in EDGES.items():
        here = _component(module)
        for target, line in targets.items():
            there = _component(target)
            if here and there and here != there:
                if (here, there) in SIDEWAYS or COMPONENTS.index(there) > COMPONENTS.index(here):
                    wrong.append(f"{_short(module)} imports {_short(target)} at line {line}")
    assert not wrong, "\n".join(wrong)


def test_no_dagster_below_the_definitions():
    below = LAYERS.index(next(layer for layer in LAYERS if layer[0] == "instance"))
    wrong = [
        f"{_short(module)} imports {name} at line {line}"
        for module, path in MODULES.items()
        if layer_of(module) < below
        for name, line in _imports(path)
        if name.split(".")[0] in ("dagster", "dagster_graphql", "dagster_webserver")
    ]
    assert not wrong, "\n".join(wrong)


def test_dagster_private_modules_only_in_the_backfill_adapter():
    wrong = [
        f"{_short(module)} imports {name} at line {line}"
        for module, path in MODULES.items()
        if module not in DAGSTER_PRIVATE
        for name, line in _imports(path)
        if name.startswith("dagster._")
    ]
    assert not wrong, "\n".join(wrong)


def test_definitions_are_loaded_for_execution_in_one_place():
    loaders = {
        module
        for module, path in MODULES.items()
        if any(name == "embedding_pipeline.defs.defs" for name, _ in _imports(path))
    }
    assert loaders == LOADS_DEFINITIONS


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(MODULES):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle():
    assert _cycles(EDGES) == []


@pytest.mark.parametrize(
    "edges, expected",
    [
        ({"a": {"b": 1}, "b": {"a": 2}}, [["a", "b"]]),
        ({"a": {"b": 1}, "b": {}}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(edges, expected, monkeypatch):
    monkeypatch.setattr(f"{__name__}.MODULES", {"a": Path("a"), "b": Path("b")})
    assert _cycles(edges) == expected


def test_a_lower_layer_importing_a_higher_one_is_caught():
    # The rule is not vacuous: a pipeline module importing the definitions would be reported.
    assert layer_of("embedding_pipeline.ingest") < layer_of("embedding_pipeline.defs.assets")
    assert layer_of("embedding_pipeline.orchestration.names") < layer_of("embedding_pipeline.sources.items")
    assert layer_of("embedding_pipeline.orchestration.instance") < layer_of("embedding_pipeline.defs")
    assert layer_of("embedding_pipeline.orchestration.runs") > layer_of("embedding_pipeline.defs")


LONG_MODULE_LINES = 450
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def test_long_modules_say_why_they_are_one_piece():
    text = ARCHITECTURE.read_text()
    explained = text[text.index("### Modules kept in one piece") :]
    long = [
        str(path.relative_to(PACKAGE))
        for path in sorted(MODULES.values())
        if len(path.read_text().splitlines()) > LONG_MODULE_LINES
    ]
    missing = [name for name in long if f"`{name}`" not in explained]
    assert not missing, f"over {LONG_MODULE_LINES} lines with no sentence in docs/architecture.md: {missing}"
