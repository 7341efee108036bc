"""The layout's rules, read from the import graph of every module (imports inside functions included):
no import circles; imports run one way, command line -> server -> cluster -> runtime; and each library stays
in its room (ggml in runtime/ggml_*.py, gRPC in cluster/transport.py, HTTP in the server, Ray in the cluster,
argparse in the command line)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "cluster", "protos")
# Lower layers never import higher ones; a module may import its own layer and those below.
LAYERS = (("runtime", 0), ("protos", 0), ("cluster", 1), ("cluster.server", 2), ("cluster.cli", 3))
HTTP_LIBRARIES = ("fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client")


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            files[name] = path
    return files


def imported_names(name: str, path: Path) -> set[str]:
    """Every module name an import in the file names: `from a.b import c` names a.b and a.b.c."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


FILES = module_files()
IMPORTS = {name: imported_names(name, path) for name, path in FILES.items()}
GRAPH = {name: {other for other in imports if other in FILES and other != name} for name, imports in IMPORTS.items()}


def layer(name: str) -> int:
    return max(rank for prefix, rank in LAYERS if name == prefix or name.startswith(prefix + "."))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def importers_of(library: str) -> set[str]:
    return {name for name, imports in IMPORTS.items()
            if any(i == library or i.startswith(library + ".") for i in imports)}


def test_the_graph_sees_the_whole_project():
    assert {"runtime.model", "runtime.ggml_forward", "cluster.head", "cluster.server.app", "cluster.cli.main",
            "runtime.synthetic.demo_model"} <= set(FILES)
    assert "runtime.ggml_forward" in GRAPH["runtime.model"]  # function-level and relative imports are read
    assert "cluster.server.service" in GRAPH["cluster.cli.serve"]


def test_circles_are_found_where_they_exist():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    assert circles(GRAPH) == []


def test_imports_run_one_way_command_line_server_cluster_runtime():
    upward = sorted(f"{name} imports {other}" for name, others in GRAPH.items() for other in others
                    if layer(other) > layer(name))
    assert upward == []


def test_the_server_never_imports_a_protocol_module():
    protocols = {"cluster.server.openai_api", "cluster.server.openai_responses", "cluster.server.anthropic_api"}
    importers = {name for name, others in GRAPH.items() if others & protocols}
    assert importers == {"cluster.server.app"}


@pytest.mark.parametrize("library, allowed", [
    ("ggml", lambda name: name.startswith("runtime.ggml_")),
    ("grpc", lambda name: name == "cluster.transport" or name.startswith("protos.")),  # and its generated stubs
    ("protos", lambda name: name == "cluster.transport" or name.startswith("protos.")),
    ("ray", lambda name: layer(name) == 1),
    ("argparse", lambda name: name.startswith("cluster.cli.")),
    *[(http, lambda name: name.startswith("cluster.server.")) for http in HTTP_LIBRARIES],
])
def test_each_library_stays_in_its_room(library, allowed):
    assert sorted(name for name in importers_of(library) if not allowed(name)) == []


def test_the_runtime_never_uses_the_synthetic_model_writers():
    engine = [name for name in FILES if layer(name) == 0 and not name.startswith("runtime.synthetic")]
    assert sorted(f"{name} imports {other}" for name in engine for other in GRAPH[name]
                  if other.startswith("runtime.synthetic")) == []
