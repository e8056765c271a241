"""docs/architecture.md, enforced: which way imports point, and who reads the environment."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "offramp"

#: The library core: depends on torch and numpy (and itself) only.
CORE = {
    "offramp._progress",
    "offramp._values",
    "offramp.activations",
    "offramp.analysis",
    "offramp.batches",
    "offramp.confidence",
    "offramp.convert",
    "offramp.costs",
    "offramp.errors",
    "offramp.evaluation",
    "offramp.files",
    "offramp.flop_formulas",
    "offramp.heads",
    "offramp.network",
    "offramp.policies",
    "offramp.timing",
}
#: The job layer: only it (and the CLI) reads the environment or imports jobs.
JOBS = ("offramp.jobs", "offramp.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every offramp import in ``path``, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("offramp"):
            found += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("offramp")]
    return found


def _deps(name: str) -> set[str]:
    deps = set()
    for module, item in _imports(MODULES[name]):
        full = f"{module}.{item}"
        deps.add(full if full in MODULES else module)
    return {d for d in deps if d in MODULES and d != name}


def _in(name: str, rooms: tuple[str, ...] | set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in rooms)


def test_no_import_cycles():
    graph = {m: _deps(m) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(d) :], d]))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not _in(m, JOBS) and m != "offramp"))
def test_library_modules_never_import_jobs_or_read_the_environment(name):
    assert not [d for d in _deps(name) if _in(d, JOBS)], f"{name} imports the job layer"
    text = MODULES[name].read_text()
    assert "os.environ" not in text and "getenv" not in text, f"{name} reads the environment"


@pytest.mark.parametrize("name", sorted(CORE))
def test_core_depends_on_core_only(name):
    assert name in MODULES, f"{name} is listed in docs/architecture.md but does not exist"
    outside = sorted(d for d in _deps(name) if d not in CORE)
    assert not outside, f"core module {name} imports {outside}"


def test_no_private_names_across_modules():
    private = [
        (name, module, item)
        for name, path in MODULES.items()
        for module, item in _imports(path)
        if item.startswith("_") and not item.startswith("__") and module != name
    ]
    assert not private


def test_architecture_doc_names_every_package_and_core_module():
    doc = (ROOT.parents[1] / "docs" / "architecture.md").read_text()
    rooms = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    missing = sorted(r for r in rooms if f"{r}" not in doc)
    assert not missing, f"docs/architecture.md does not mention {missing}"
