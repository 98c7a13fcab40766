"""The habits that keep the tree livable, checked from the source text (nothing is imported or run):
no import cycle between modules, no private name imported across modules, modules of a readable length,
`models/` and `pipeline/vectors/` independent of the rest of `pipeline/`, and a README layout table that
names every module that exists and no module that does not."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "models")
MAX_LINES = 450
# Modules allowed past MAX_LINES: none since retrieval.py's scoring moved to ranks.py (its spec stays in
# retrieval.py's docstring).
LONG_ALLOWED: set[str] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every project import in a module."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    out.append((f"{target}.{alias.name}", None))
                elif target in MODULES:
                    out.append((target, alias.name))
        elif isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names if alias.name in MODULES]
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        # A package's own __init__ re-exporting its modules is not a dependency of those modules.
        graph[name] = {target for target, _ in _imports(name, path)
                       if target != name and not (MODULES[target].name == "__init__.py"
                                                  and name.startswith(target + "."))}
    return graph


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_name_imported_across_modules():
    private = [f"{name} imports {target}.{imported}"
               for name, path in MODULES.items() for target, imported in _imports(name, path)
               if imported and imported.startswith("_") and not imported.startswith("__") and target != name]
    assert not private, "\n".join(private)


def test_modules_stay_readable():
    long = [f"{path.relative_to(ROOT)} ({path.read_text().count(chr(10))} lines)" for path in MODULES.values()
            if path.read_text().count("\n") > MAX_LINES and path.relative_to(ROOT).as_posix() not in LONG_ALLOWED]
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# A bottom layer may use these of pipeline/ (vectors/ writes its FAISS index atomically).
BELOW = {"models": (), "pipeline.vectors": ("pipeline.core.atomic", "pipeline.core.cpus")}


@pytest.mark.parametrize("layer", sorted(BELOW))
def test_bottom_layers_import_nothing_above_them(layer):
    graph = _graph()
    upward = [f"{name} -> {target}" for name, targets in graph.items() if name == layer or name.startswith(layer + ".")
              for target in targets if target.startswith("pipeline") and not target.startswith(layer)
              and target not in BELOW[layer]]
    assert not upward, upward


def _layout_table() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`"):
            rows.append((cells[0], cells[1]))
    return rows


def test_readme_layout_table_matches_the_tree():
    """Every package has a row naming each of its modules; every module a row names exists."""
    rows = _layout_table()
    assert rows, "README.md has no layout table"
    listed: dict[str, set[str]] = {}
    for place, holds in rows:
        folder = place.strip("`").rstrip("/")
        listed[folder] = set(re.findall(r"`([A-Za-z_][\w]*)`", holds))
    problems = []
    folders = {path.parent.relative_to(ROOT).as_posix() for path in MODULES.values()}
    for folder in sorted(folders):
        files = {p.stem for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
        if folder not in listed:
            problems.append(f"{folder}/ has no row")
            continue
        problems += [f"{folder}/{m}.py is not named in its row" for m in sorted(files - listed[folder])]
        problems += [f"{folder}/ row names `{m}`, which does not exist" for m in sorted(listed[folder] - files)]
    problems += [f"row `{f}` is not a package folder" for f in listed if f not in folders]
    assert not problems, "\n".join(problems)
