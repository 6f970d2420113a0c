"""The structure shows the design: packages import downward only, with no cycles.

Each package has a rank; a module may import its own package and packages of a lower rank,
never a higher one and never a peer of the same rank. The table is the layout in one screen
(CONTRIBUTING.md repeats it). Pure AST: no module is imported to check this.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The card's folders install under the stormline namespace (pyproject's package-dir).
FOLDERS = {
    "stormline": "stormline",
    "schemas": "stormline.schemas",
    "producers": "stormline.producers",
    "consumers": "stormline.consumers",
    "streams": "stormline.streams",
    "trainer": "stormline.trainer",
    "deploy": "stormline.deploy",
}
# (rank, package prefix), lowest first. Same rank = peers, which must not import each other.
LAYERS: list[tuple[int, str]] = [
    (0, "stormline.settings"),
    (1, "stormline.logs"),
    (1, "stormline.metrics"),
    (1, "stormline.tracing"),
    (2, "stormline.runtime"),
    (3, "stormline.schemas"),
    (4, "stormline.state"),
    (5, "stormline.consumers.llm"),
    (6, "stormline.trainer"),
    (7, "stormline.producers"),
    (7, "stormline.consumers.worker"),
    (7, "stormline.consumers.evaluator"),
    (7, "stormline.consumers.sink"),
    (7, "stormline.streams"),
    (8, "stormline.deploy"),
    (9, "stormline.api"),
    (10, "stormline.cli"),
    (10, "stormline.client"),
]
# Packages that only hold others (their __init__ is a docstring).
CONTAINERS = {"stormline", "stormline.consumers"}


def _package_of(module: str) -> tuple[int, str] | None:
    best = None
    for rank, prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best[1])
        ):
            best = (rank, prefix)
    return best


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for folder, pkg in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = [p for p in rel if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Stormline modules that ``path`` imports (anywhere in the file, lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in {"schemas", "producers", "consumers", "streams", "trainer"}:
                found.add("!bare:" + name)  # an import that only works from the source tree
            elif name in modules:
                found.add(name)
    return found


def test_every_module_belongs_to_a_layer() -> None:
    orphans = [m for m in _modules() if m not in CONTAINERS and _package_of(m) is None]
    assert not orphans, f"add these to LAYERS (and CONTRIBUTING.md): {orphans}"


def test_no_import_goes_up_or_sideways() -> None:
    modules = _modules()
    bad = []
    for mod, path in modules.items():
        src = _package_of(mod)
        for target in _imports(path, modules):
            if target.startswith("!bare:"):
                bad.append(f"{mod} imports {target[6:]} outside the stormline namespace")
                continue
            dst = _package_of(target)
            if src is None or dst is None or dst[1] == src[1]:
                continue
            if dst[0] >= src[0]:
                bad.append(f"{mod} (rank {src[0]}) imports {target} (rank {dst[0]})")
    assert not bad, "imports that go up or sideways:\n" + "\n".join(sorted(bad))


def test_no_import_cycles_between_modules() -> None:
    modules = _modules()
    graph = {m: _imports(p, modules) & modules.keys() for m, p in modules.items()}
    # A package importing its own submodules is how packages work, not a cycle.
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".") and t != m}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_package_is_installed() -> None:
    """pyproject lists every package folder, so a wheel holds all of them under stormline."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    assert cfg["package-dir"] == {v: k for k, v in FOLDERS.items()}
    found = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert found <= listed, f"missing from pyproject: {found - listed}"
    # The rest are folders of data files, listed so that setuptools ships them quietly.
    by_package = {pkg: folder for folder, pkg in FOLDERS.items()}
    for data in listed - found:
        top = max((p for p in by_package if data.startswith(p + ".")), key=len)
        folder = ROOT / by_package[top] / Path(*data.removeprefix(top + ".").split("."))
        assert folder.is_dir() and any(folder.iterdir()), f"stale in pyproject: {data}"
        assert not list(folder.glob("*.py")), f"{data} holds modules: give it an __init__.py"
