"""backend/settings.py: every environment variable the code reads is in the one table that
`--help-env` prints, and two declarations of one variable agree on its default."""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

from backend.config import SETTINGS, Config
from backend.settings import declarations, help_text, variables

REPO = Path(__file__).resolve().parents[1]
# Read from the environment, but not settings: the user name that signs a CLI action.
NOT_SETTINGS = {"USER", "PYTHONPATH"}   # the OS's and Python's own, passed through to children

READS = [
    re.compile(r"""environ\.get\(\s*["']([A-Z][A-Z0-9_]+)["']"""),          # os.environ.get("X")
    re.compile(r"""\benv\.get\(\s*["']([A-Z][A-Z0-9_]+)["']"""),            # env.get("X")
    re.compile(r"""^\s*[A-Z_]*ENV[A-Z_]*\s*=\s*["']([A-Z][A-Z0-9_]+)["']""", re.M),   # DB_ENV = "X"
    re.compile(r"""^\s*\(\s*"\w+",\s*"([A-Z][A-Z0-9_]+)",""", re.M),            # a settings-table row
]


def read_in_code() -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for folder in ("backend", "model", "training"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for pattern in READS:
                for name in pattern.findall(text):
                    found[name].add(str(path.relative_to(REPO)))
    return found


def test_every_variable_the_code_reads_is_listed():
    listed = {v.name for v in variables()}
    found = read_in_code()
    assert len(found) > 50                                   # the patterns do find the reads
    missing = {name: sorted(where) for name, where in found.items() if name not in listed | NOT_SETTINGS}
    assert not missing, f"read but not in backend/settings.py: {missing}"


def test_declarations_of_one_variable_agree_on_the_default():
    defaults: dict[str, set[str]] = defaultdict(set)
    for name, default, _, _ in declarations():
        defaults[name].add(default)
    assert {n: d for n, d in defaults.items() if len(d) > 1} == {}
    shared = {v.name: v.read_by for v in variables() if len(v.read_by) > 1}
    assert {"REDIS_URL", "TRAINING_QUEUE", "DATA_DIR", "MODEL_REGISTRY"} <= set(shared)


def test_help_env_of_both_commands_prints_every_variable(capsys):
    from backend.__main__ import main as backend_main
    from backend.jobs import main as jobs_main

    assert backend_main(["--help-env"]) == 0
    backend_text = capsys.readouterr().out
    assert jobs_main(["--help-env"]) == 0
    assert capsys.readouterr().out == backend_text
    assert backend_text.strip() == help_text()
    for v in variables():
        assert f"| `{v.name}` |" in backend_text
    assert "`WEBHOOK_DEDUP_SECONDS`" in backend_text and "`FINETUNE_STEPS`" in backend_text


def test_the_backend_table_matches_its_config():
    assert [f.name for f in fields(Config)] == [row[0] for row in SETTINGS]
