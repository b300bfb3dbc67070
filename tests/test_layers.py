"""The package's layers only point down (docs/ARCHITECTURE.md): a module may import its own layer and those below.

Lazy imports inside functions count too: a layer that reaches up at run time is as tangled as one that does so at
import time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import cellcls

PACKAGE = Path(cellcls.__file__).parent

# bottom to top; a module belongs to the first entry whose prefix matches it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("cellcls.errors", "cellcls.paths", "cellcls.processes", "cellcls.metric_names", "cellcls.config")),
    ("infra", ("cellcls.infra",)),
    ("scoring", ("cellcls.scoring",)),
    ("data", ("cellcls.data",)),
    ("models", ("cellcls.models",)),
    ("evaluation", ("cellcls.evaluation",)),
    ("training", ("cellcls.training",)),
    ("deploy", ("cellcls.deploy",)),
    ("commands", ("cellcls",)),
]
# Modules run with `python -m` sit on top whatever their folder: `cellcls.data.inspect` keeps its documented name.
COMMANDS = ("cellcls.data.inspect",)
# Peers on one level, neither importing the other: training and deployment both stand on evaluation.
PEERS = {frozenset({"training", "deploy"})}
RANK = {"foundation": 0, "infra": 1, "scoring": 2, "data": 3, "models": 4, "evaluation": 5, "training": 6,
        "deploy": 6, "commands": 7}


def layer_of(module: str) -> str:
    if module in COMMANDS:
        return "commands"
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(f"{module} is in no layer")


def module_name(path: Path) -> str:
    parts = ["cellcls", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cellcls"):
            found.add(node.module)
            for alias in node.names:  # `from cellcls.infra import plots` imports cellcls.infra.plots
                if (PACKAGE / Path(*node.module.split(".")[1:]) / f"{alias.name}.py").exists():
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cellcls")}
    return found


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        mine = layer_of(here)
        for target in sorted(imports_of(path)):
            theirs = layer_of(target)
            if frozenset({mine, theirs}) in PEERS and mine != theirs or RANK[theirs] > RANK[mine]:
                bad.append(f"{here} ({mine}) imports {target} ({theirs})")
    return bad


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    assert upward_imports() == []


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from cellcls.training.fit import fit\n    from cellcls.infra import plots\n")
    found = imports_of(source)
    assert "cellcls.training.fit" in found and "cellcls.infra.plots" in found
    assert RANK[layer_of("cellcls.training.fit")] > RANK[layer_of("cellcls.evaluation.evaluate")]
    assert layer_of("cellcls.data.inspect") == "commands" and layer_of("cellcls.errors") == "foundation"


def test_every_module_is_in_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_every_module_the_architecture_page_names_exists():
    page = (PACKAGE.parents[1] / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:\w+/)*\w+\.py)", page))
    assert len(named) > 20
    repo = PACKAGE.parents[1]
    assert sorted(n for n in named if not (PACKAGE / n).is_file() and not (repo / n).is_file()) == []
