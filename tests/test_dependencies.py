"""Every third-party package the code imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _canonical(name: str) -> str:
    """PEP 503 name: ``Open_Clip.torch`` and ``open-clip-torch`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules() -> dict[str, set[str]]:
    """Top-level module -> the hybridcls files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "hybridcls").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_canonical(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


#: Imported on purpose without being a dependency, each for one optional comparison.
NOT_DEPENDENCIES = {
    "bioclip": "bench speed times pybioclip beside hybridcls only when it is installed",
}


def test_every_third_party_import_is_a_declared_dependency():
    third_party = {m: files for m, files in _imported_top_level_modules().items()
                   if m not in sys.stdlib_module_names and m != "hybridcls"
                   and m not in NOT_DEPENDENCIES}
    # the ones this test was written for: imported directly, once missing from pyproject.toml
    assert {"scipy", "huggingface_hub"} <= set(third_party)
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = []
    for module, files in sorted(third_party.items()):
        if module not in distributions:
            pytest.fail(f"{module} (imported in {min(files)}) is not installed here: "
                        "cannot tell which distribution provides it")
        if not any(_canonical(d) in declared for d in distributions[module]):
            undeclared.append(f"{module} ({', '.join(distributions[module])}; {min(files)})")
    assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)


def _hybridcls_imports(path: Path) -> set[str]:
    """The ``hybridcls.*`` modules a file imports, anywhere in it (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] == "hybridcls"}


# Imports flow one way (docs/architecture.md): the gate and the index work on arrays, below
# the models, the engine and the evaluation that use them.
_MAY_IMPORT = {
    "gate": ("hybridcls.gate", "hybridcls.index", "hybridcls.cache", "hybridcls.errors"),
    "index.py": ("hybridcls.cache", "hybridcls.errors"),
}


@pytest.mark.parametrize("layer", sorted(_MAY_IMPORT))
def test_the_array_layers_import_nothing_above_them(layer):
    base = ROOT / "hybridcls" / layer
    files = sorted(base.rglob("*.py")) if base.is_dir() else [base]
    allowed = _MAY_IMPORT[layer]
    above = {f"{path.relative_to(ROOT)}: {name}" for path in files
             for name in _hybridcls_imports(path)
             if not any(name == a or name.startswith(a + ".") for a in allowed)}
    assert len(files) > 0 and above == set()
