"""model/settings.py: every environment variable is declared there once, the code reads the
environment only through it, every declared variable is read, and `--help-env` prints them all."""
from __future__ import annotations

import ast
import re
import runpy
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import pytest

import model.settings as settings
from backend.config import Config
from backend.finetune import FinetuneSettings
from backend.jobs import JobSettings
from model.settings import ALL, Setting, SettingError, help_text

REPO = Path(__file__).resolve().parents[1]
SETTINGS_FILE = REPO / "model" / "settings.py"
# Read from the environment, but not settings: the user name that signs a CLI action, and the
# PYTHONPATH passed through to torchrun's children.
NOT_SETTINGS = {"USER", "PYTHONPATH"}

READS = [
    re.compile(r"""environ\.get\(\s*["']([A-Z][A-Z0-9_]+)["']"""),          # os.environ.get("X")
    re.compile(r"""environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]"""),          # os.environ["X"]
    re.compile(r"""getenv\(\s*["']([A-Z][A-Z0-9_]+)["']"""),                # os.getenv("X")
    re.compile(r"""\benv\.get\(\s*["']([A-Z][A-Z0-9_]+)["']"""),            # env.get("X")
]
# A read through a name (os.environ.get(SOME_VAR)) would hide the variable from the scan above.
INDIRECT = re.compile(r"""(environ\.get\(|getenv\(|environ\[)\s*[A-Za-z_]\w*\b(?!\s*\]\s*=)""")


def code_files() -> list[Path]:
    return [p for folder in ("backend", "model", "training") for p in sorted((REPO / folder).rglob("*.py"))
            if p != SETTINGS_FILE]


def direct_reads() -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for path in code_files():
        text = path.read_text()
        for pattern in READS:
            for name in pattern.findall(text):
                found[name].add(str(path.relative_to(REPO)))
        for m in INDIRECT.finditer(text):
            found[f"<{m.group(0)}>"].add(str(path.relative_to(REPO)))
    return found


def imported_settings() -> set[str]:
    """The names the code imports from model.settings (absolute, or relative inside model/)."""
    names = set()
    for path in code_files():
        in_model = path.parts[len(REPO.parts)] == "model"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                    node.module == "model.settings" or (in_model and node.level == 1 and node.module == "settings")):
                names |= {alias.name for alias in node.names}
    return names


def test_the_code_reads_the_environment_only_through_model_settings():
    found = direct_reads()
    assert "USER" in found                                   # the patterns do find a read
    other = {name: sorted(where) for name, where in found.items() if name not in NOT_SETTINGS}
    assert not other, f"read outside model/settings.py: {other}"


def test_every_declared_variable_is_read_somewhere():
    used = imported_settings() | {s.fallback for s in ALL if s.fallback}
    assert len(used) > 50
    assert [s.name for s in ALL if s.name not in used] == []


def test_each_variable_is_declared_once_under_its_own_name():
    names = [s.name for s in ALL]
    assert len(names) == len(set(names)) > 70
    for s in ALL:
        assert getattr(settings, s.name) is s
        s.read({})                                           # the default parses
    module_settings = [v for v in vars(settings).values() if isinstance(v, Setting)]
    assert len(module_settings) == len(ALL)                  # every declaration is in ALL
    # Read by several parts, declared once (issue 12: these four were declared twice).
    for name in ("REDIS_URL", "TRAINING_QUEUE", "DATA_DIR", "MODEL_REGISTRY"):
        assert {"backend", "worker"} <= set(getattr(settings, name).read_by), name


def test_one_parser():
    s = Setting("X_INT", int, "3", "", ())
    assert s.read({}) == 3 and s.read({"X_INT": "  "}) == 3 and s.read({"X_INT": " 7 "}) == 7
    with pytest.raises(SettingError, match=r"X_INT='many': expected int"):
        s.read({"X_INT": "many"})
    choice = Setting("X_FORMAT", ("auto", "brush"), "auto", "", ())
    assert choice.read({"X_FORMAT": "Brush"}) == "brush"
    with pytest.raises(SettingError, match="X_FORMAT='mesh': must be one of auto, brush"):
        choice.read({"X_FORMAT": "mesh"})
    flag = Setting("X_FLAG", bool, "false", "", ())
    assert flag.read({}) is False and flag.read({"X_FLAG": "yes"}) is True and flag.read({"X_FLAG": "0"}) is False
    keep = Setting("X_LIST", str, "a,b", "", (), keep_empty=True)
    assert keep.read({}) == "a,b" and keep.read({"X_LIST": ""}) == ""
    with_fallback = Setting("X_ROOT", str, "", "", (), fallback="X_OTHER")
    assert with_fallback.read({"X_OTHER": "/o"}) == "/o" and with_fallback.read({"X_ROOT": "/r", "X_OTHER": "/o"}) == "/r"


@pytest.mark.parametrize("cls", [Config, JobSettings, FinetuneSettings])
def test_the_settings_classes_take_every_field_from_a_declaration(cls):
    assert all(isinstance(f.metadata.get("setting"), Setting) for f in fields(cls))
    assert cls() == cls.from_env({})                        # the field defaults are the declared ones


def test_the_enqueue_default_is_the_one_the_help_names():
    from backend.config import DEFAULT_ENQUEUE

    assert DEFAULT_ENQUEUE in settings.TRAINING_ENQUEUE.meaning


def test_help_env_of_both_commands_prints_every_variable(capsys):
    from backend.__main__ import main as backend_main
    from backend.jobs import main as jobs_main

    assert backend_main(["--help-env"]) == 0
    backend_text = capsys.readouterr().out
    assert jobs_main(["--help-env"]) == 0
    assert capsys.readouterr().out == backend_text
    assert backend_text.strip() == help_text()
    for s in ALL:
        assert f"| `{s.name}` |" in backend_text
    assert "`WEBHOOK_DEDUP_SECONDS`" in backend_text and "`FINETUNE_STEPS`" in backend_text
    assert {line.count("|") for line in help_text().splitlines()} == {6}     # five cells in every row


def test_gunicorn_conf_reads_the_declared_settings(monkeypatch):
    conf = REPO / "backend" / "gunicorn.conf.py"
    for s in ALL:
        monkeypatch.delenv(s.name, raising=False)
    default = runpy.run_path(str(conf))
    assert (default["bind"], default["workers"], default["threads"], default["loglevel"]) == \
        ("127.0.0.1:9090", 1, 4, "info")
    monkeypatch.setenv("PORT", "9191")
    assert runpy.run_path(str(conf))["bind"] == "127.0.0.1:9191"
    monkeypatch.setenv("GUNICORN_BIND", "0.0.0.0:9090")
    monkeypatch.setenv("GUNICORN_WORKERS", "2")
    set_ = runpy.run_path(str(conf))
    assert (set_["bind"], set_["workers"]) == ("0.0.0.0:9090", 2)


def test_the_settings_objects_take_overrides_by_one_rule():
    """An override that is not None wins, None keeps the variable's value, an unknown name raises
    (model.settings.read_with_overrides), for Config, JobSettings and FinetuneSettings alike."""
    env = {"TRAINING_QUEUE": "from-env", "FINETUNE_STEPS": "12", "MAX_CLICKS": "7"}
    assert Config.from_env(env, max_clicks=9).max_clicks == 9
    assert Config.from_env(env, max_clicks=None).max_clicks == 7
    with pytest.raises(ValueError, match="unknown backend settings"):
        Config.from_env(env, max_clikcs=3)
    assert JobSettings.from_env(env, queue="given").queue == "given"
    assert JobSettings.from_env(env, queue=None).queue == "from-env"
    assert FinetuneSettings.from_env(env, steps=30).steps == 30
    assert FinetuneSettings.from_env(env, steps=None).steps == 12
    with pytest.raises(ValueError, match="unknown job queue settings"):
        JobSettings.from_env(env, queu="typo")
    with pytest.raises(ValueError, match="unknown fine-tuning settings"):
        FinetuneSettings.from_env(env, stpes=3)
