"""The packages depend one way: model <- training <- backend.

model is the network, predictor and checkpoints, and imports nothing of ours; training
(data, losses, the train loop, evaluation, export) imports model only; backend (the HTTP app, the
Label Studio integration, the fine-tuning job service) imports both. Every import counts, at the
top of a module or inside a function, absolute or relative.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {"model": set(), "training": {"model"}, "backend": {"model", "training"}}


def _module(path: Path, repo: Path = REPO) -> list[str]:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(path: Path, repo: Path = REPO) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, relative ones made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module(path, repo)
    package = module if path.name == "__init__.py" else module[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def violations(path: Path, repo: Path = REPO) -> list[str]:
    own = _module(path, repo)[0]
    out = []
    for line, name in imported_modules(path, repo):
        top = name.split(".")[0]
        if top in ALLOWED and top != own and top not in ALLOWED[own]:
            out.append(f"{path.relative_to(repo)}:{line}: {own} imports {name}")
    return out


def test_dependencies_point_one_way():
    files = [p for pkg in ALLOWED for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 50
    bad = [v for p in files for v in violations(p)]
    assert not bad, "imports against the layering model <- training <- backend:\n" + "\n".join(bad)


@pytest.mark.parametrize("package, source, bad", [
    ("model", "def f():\n    from training.evaluation import datasets\n", True),
    ("model", "from .. import checkpoint\nimport torch\n", False),
    ("model", "import backend.labelstudio.masks as m\n", True),
    ("model", "from .checkpoint import resolve\nimport numpy\n", False),
    ("training", "import backend.jobs\n", True),
    ("training", "from model.checkpoint import resolve\n", False),
    ("backend", "from training.redisconn import connect\nfrom model import files\n", False),
])
def test_the_check_sees_every_kind_of_import(tmp_path, package, source, bad):
    f = tmp_path / package / "sub" / "mod.py"
    f.parent.mkdir(parents=True)
    f.write_text(source)
    assert bool(violations(f, tmp_path)) == bad
