"""The package's rooms and the rules between them, read from the source (no module is imported).

Rooms: the kernel (top-level modules), ``wire``, ``deciding``, ``client``, ``learning``,
``trainer``, ``analysis``, ``collect``, ``service``, ``tools``, ``fleet``; the plugins (``reflexd.plugins``, ``reflexd.exporters``) are
reached only through their entry-point groups.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"daemon": "reflexd", "plugins": "reflexd.plugins", "exporters": "reflexd.exporters"}
KERNEL = {"reflexd.errors", "reflexd.worker", "reflexd.config", "reflexd.features", "reflexd.split", "reflexd.durable",
          "reflexd.log", "reflexd.manifest", "reflexd.registry", "reflexd.extensions", "reflexd.lines"}
HEAVY = ("torch", "duckdb")
# third-party packages whose importers are tracked too: Ray (the fleet extra) belongs to the fleet alone
TRACKED = (*HEAVY, "ray")


def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([FOLDERS[folder], *parts])


def _type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, package: str) -> set[str]:
    """Every module this source imports at run time, at any depth (TYPE_CHECKING blocks excepted)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            modules[_module_name(path)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        raw = _imports(ast.parse(path.read_text(), str(path)), package)
        # ``from reflexd.x import y`` names y, which is a module only if one exists
        # a parent package is always imported before its modules: an edge to it says nothing
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {m for m in raw if m in modules and m != name and m not in ancestors}
        graph[name] |= {m for m in raw if m.split(".")[0] in TRACKED}
    return graph


GRAPH = _graph()


def _room(module: str) -> str:
    if module in KERNEL:
        return "kernel"
    if module == "reflexd":
        return "face"  # the public face: Policy and the errors, for the agent
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kernel"


def _heavy(targets: set[str]) -> set[str]:
    return {t for t in targets if t.split(".")[0] in HEAVY}


def _in(room: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in GRAPH.items() if _room(m) == room}


def test_the_graph_was_read() -> None:
    assert "reflexd.client.policy" in GRAPH and "reflexd.deciding.scoring" in GRAPH["reflexd.client.policy"]
    assert "reflexd.plugins.learners.mlp" in GRAPH and "torch" in GRAPH["reflexd.plugins.learners.mlp"]


def test_the_client_sees_only_the_kernel_wire_and_deciding() -> None:
    for module, deps in _in("client").items():
        rooms = {_room(d) for d in deps if not _heavy({d})}
        assert rooms <= {"kernel", "wire", "deciding", "client"}, (module, sorted(deps))
        assert not _heavy(deps), module
    for module in ("reflexd.wire.protocol", "reflexd.wire.framing", "reflexd.wire.connection",
                   "reflexd.deciding.scoring", "reflexd.deciding.choosing", "reflexd.deciding.exploring"):
        assert {_room(d) for d in GRAPH[module]} <= {"kernel", "wire", "deciding"}, module
        assert not _heavy(GRAPH[module]), module


def test_learning_is_pure() -> None:
    for module, deps in _in("learning").items():
        assert not {d for d in deps if _room(d) in ("service", "trainer", "tools", "client")}, module
        assert not _heavy(deps), module


def test_the_trainer_never_imports_the_service_and_the_service_reaches_it_only_through_its_result() -> None:
    for module, deps in _in("trainer").items():
        assert not {d for d in deps if _room(d) in ("service", "tools", "client")}, module
    for module, deps in _in("service").items():
        assert {d for d in deps if _room(d) == "trainer"} <= {"reflexd.trainer", "reflexd.trainer.result"}, module
        assert "torch" not in deps, module


def test_analysis_is_numbers_in_findings_out_and_the_service_reaches_it_only_through_its_result() -> None:
    # the extraction runs as a subprocess: numpy and scikit-learn never enter the daemon's memory
    for module, deps in _in("analysis").items():
        assert not {d for d in deps if _room(d) in ("service", "trainer", "tools", "client", "collect")}, module
        assert not _heavy(deps), module
    for room in ("service", "tools", "client"):
        for module, deps in _in(room).items():
            reached = {d for d in deps if _room(d) == "analysis"}
            assert reached <= {"reflexd.analysis", "reflexd.analysis.result", "reflexd.analysis.findings"}, module


def test_trace_ingest_sees_the_wire_and_the_service_it_hands_events_to_never_the_learners() -> None:
    for module, deps in _in("collect").items():
        rooms = {_room(d) for d in deps if not _heavy({d})}
        assert rooms <= {"kernel", "wire", "service", "collect"}, (module, sorted(deps))
        assert not _heavy(deps), module


def test_only_the_fleet_imports_ray_and_nothing_that_serves_imports_the_fleet() -> None:
    # the fleet may use the kernel, learning (the join, the gate's rule), the trainer (its export),
    # deciding (the Scorer the gate judges with); the daemon and the client never see it
    assert "ray" in GRAPH["reflexd.fleet.train"] and "reflexd.fleet.archive" in GRAPH["reflexd.fleet.train"]
    for module, deps in _in("fleet").items():
        rooms = {_room(d) for d in deps if d.split(".")[0] not in TRACKED}
        assert rooms <= {"kernel", "learning", "trainer", "deciding", "fleet"}, (module, sorted(deps))
    for room in ("service", "client", "deciding", "wire", "learning", "trainer", "kernel", "face"):
        for module, deps in _in(room).items():
            assert not {d for d in deps if _room(d) == "fleet"}, (module, sorted(deps))
    for module, deps in GRAPH.items():
        if _room(module) != "fleet":
            assert not {d for d in deps if d.split(".")[0] == "ray"}, module


def test_the_command_line_imports_the_fleet_only_when_a_fleet_command_runs() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from reflexd.tools import cli; cli.build_parser().parse_args(['fleet', 'train', 'a', '--out', 'b']);"
        "bad = [m for m in ('ray', 'reflexd.fleet') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_core_never_imports_a_plugin_by_path() -> None:
    for module, deps in GRAPH.items():
        if module.startswith(("reflexd.plugins", "reflexd.exporters")):
            continue
        plugins = {d for d in deps if d.startswith(("reflexd.plugins", "reflexd.exporters"))}
        assert not plugins, (module, sorted(plugins))


def test_the_kernel_imports_no_room() -> None:
    for module in KERNEL:
        assert {_room(d) for d in GRAPH[module]} <= {"kernel"}, (module, sorted(GRAPH[module]))


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            connect(v)
    assert cycles == []


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_every_exception_is_defined_in_errors(folder: str) -> None:
    for path in (ROOT / folder).rglob("*.py"):
        if path == ROOT / "daemon" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not {b for b in bases if b.endswith(("Error", "Exception", "Fault"))}, (path, node.name)
