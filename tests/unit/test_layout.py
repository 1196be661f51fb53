"""The layout's import rules: what each package may import, read from the code's own imports.

The folder tree draws the flow: ``producers/`` and ``consumers/`` are peers over the shared
``runtime/``, which imports neither; inside the runtime each package may import only the packages
below it. Imports inside functions count the same as imports at the top of a module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("runtime", "producers", "consumers", "schemas")

#: package -> the project packages its modules may import (itself always allowed).
RULES: dict[str, frozenset[str]] = {
    "runtime.errors": frozenset(),
    "runtime.atproto": frozenset(),
    "runtime.contract": frozenset({"runtime.errors", "runtime.atproto", "schemas"}),
    "runtime.process": frozenset({"runtime.errors", "runtime.contract"}),
    "runtime.kafka": frozenset({"runtime.errors", "runtime.contract", "runtime.process", "schemas"}),
    "runtime.simulator": frozenset({"runtime.errors", "runtime.atproto", "runtime.contract", "runtime.process"}),
    "runtime.commands": frozenset({"runtime", "runtime.errors", "runtime.atproto", "runtime.contract",
                                   "runtime.process", "runtime.kafka", "runtime.simulator"}),
    "producers": frozenset({"runtime", "runtime.errors", "runtime.atproto", "runtime.contract", "runtime.process",
                            "runtime.kafka", "schemas"}),
    "consumers": frozenset({"runtime", "runtime.errors", "runtime.atproto", "runtime.contract", "runtime.process",
                            "runtime.kafka", "schemas"}),
    "schemas": frozenset(),
}


def _package_of(module: str) -> str:
    """The package a rule is written for: the longest key of RULES that ``module`` falls under."""
    best = ""
    for key in RULES:
        if (module == key or module.startswith(key + ".")) and len(key) > len(best):
            best = key
    if not best and module == "runtime":
        return "runtime"
    return best


def _modules() -> Iterator[tuple[str, Path]]:
    for top in PROJECT:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            yield ".".join(parts), path


def _imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:  # ``from runtime import kafka`` imports the package runtime.kafka
                yield node.lineno, f"{target}.{alias.name}"


def _project_target(name: str) -> str | None:
    top = name.split(".", maxsplit=1)[0]
    if top not in PROJECT:
        return None
    target = _package_of(name)
    if target:
        return target
    # ``from runtime import __version__`` and similar: the runtime's own face
    return "runtime" if top == "runtime" else top


def violations() -> list[str]:
    """Every import that breaks a rule, as ``file:line: module -> target``."""
    found: list[str] = []
    for module, path in _modules():
        own = _package_of(module) or ("runtime" if module == "runtime" or module == "runtime.__main__" else "")
        if own in ("runtime", ""):
            continue  # runtime/__init__.py and runtime/__main__.py: the package's face and `python -m runtime`
        allowed = RULES[own]
        for line, name in _imports(module, path):
            target = _project_target(name)
            if target is None or target == own or target.startswith(own + "."):
                continue
            if target not in allowed and not any(target.startswith(a + ".") for a in allowed):
                found.append(f"{path.relative_to(ROOT)}:{line}: {module} -> {name}")
    return sorted(set(found))


def test_every_import_keeps_the_layout_rules() -> None:
    assert violations() == []


def test_every_module_falls_under_a_rule() -> None:
    unruled = [m for m, _ in _modules() if not _package_of(m) and m not in ("runtime", "runtime.__main__")]
    assert unruled == []


@pytest.mark.parametrize("package", sorted(p for p in RULES if p.count(".") == 1 and p != "runtime.errors"))
def test_each_runtime_package_says_what_it_owns_and_may_import(package: str) -> None:
    init = ROOT / package.replace(".", "/") / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    assert doc, f"{init} has no docstring"
    assert "import" in doc.lower(), f"{init}'s docstring does not say what it may import"


def test_the_rules_catch_a_wrong_way_import(tmp_path: Path) -> None:
    """The checker itself: a runtime module importing a consumer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from consumers.queue import Queue\n", encoding="utf-8")
    imports = list(_imports("runtime.contract.bad", bad))
    assert (1, "consumers.queue") in imports
    assert _project_target("consumers.queue") == "consumers"
    assert "consumers" not in RULES["runtime.contract"]
