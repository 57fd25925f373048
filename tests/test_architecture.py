"""The stage packages keep their order: no module imports a package above its own, library code
never imports the viewer (only the command line does), and neither the classical baseline nor the
viewer imports the fit."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lower first; a package may import its own and any lower one. classical and evaluate stand beside
# the fit; api and the command line sit on top.
LAYERS = ["core", "io", "kernels", "physics", "measure", "classical", "evaluate", "fit", "api", "validation", "batch",
          "scene", "cli"]
PEERS = {"classical": {"fit", "evaluate"}, "evaluate": {"fit", "classical"}}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "engine" and len(parts) > 1 else None


def test_no_package_imports_one_above_it():
    order = {name: i for i, name in enumerate(LAYERS)}
    problems = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        own = stage(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if own is None or own == "__init__":
            continue
        for module in imported_modules(path):
            other = stage(module)
            if other is None or other == own or other not in order:
                continue
            if order[other] > order[own] or other in PEERS.get(own, ()):
                problems.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not problems, problems


def test_only_the_command_line_imports_the_viewer():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "engine").rglob("*.py")
                 if p.name != "cli.py" and any(m.split(".")[0] == "viewer" for m in imported_modules(p))]
    assert not offenders


def test_viewer_and_baseline_never_import_the_fit():
    paths = list((ROOT / "viewer").rglob("*.py")) + list((ROOT / "engine" / "classical").rglob("*.py"))
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in paths for m in imported_modules(p)
                 if m.startswith("engine.fit")]
    assert not offenders
