"""Tests of ``supervisor.config``: defaults, the documented file, key-path errors, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import (
    DEFAULT_GUARDED_ROUTES,
    Config,
    ConfigError,
    load_config,
    parse_config,
    reload_plan,
    validate,
)

REPO = Path(__file__).resolve().parent.parent
DOCUMENTED = REPO / "config" / "supervisor.yaml"


def _errors(mapping: Any) -> list[str]:
    """The error lines ``parse_config`` raises for ``mapping`` (fails if it accepts it)."""
    with pytest.raises(ConfigError) as info:
        parse_config(mapping)
    assert info.value.errors, "a ConfigError must carry at least one line"
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


# --------------------------------------------------------------------------- defaults

DEFAULTS = [
    # (attribute path, documented default)
    ("listen.host", "127.0.0.1"),
    ("listen.port", 8001),
    ("upstream.url", "http://127.0.0.1:8000"),
    ("state_dir", "/var/lib/blast-supervisor"),
    ("log_source.type", "file"),
    ("log_source.path", "/var/log/api-blast/app.log"),
    ("queue.max_retries", 3),
    ("queue.retry_delay_s", 5),
    ("queue.max_queue_size", 100),
    ("queue.processing_timeout_s", 30),
    ("queue.batch_size", 1),
    ("queue.process_interval_s", 2),
    ("session.check_interval_s", 60),
    ("session.conflict_delay_s", 30),
    ("session.connection_timeout_s", 120),
    ("session.keepalive_s", 45),
    ("monitoring.healthy.min_success_rate", 80),
    ("monitoring.healthy.max_queue", 10),
    ("monitoring.warning.min_success_rate", 60),
    ("monitoring.warning.max_queue", 20),
    ("auth.mode", "upstream"),
    ("queue.on_unknown", "retry"),
]


@pytest.mark.parametrize(("path", "expected"), DEFAULTS)
def test_defaults_are_the_spec_seed_values(path: str, expected: Any) -> None:
    """``parse_config(None)`` gives the documented default at every documented key."""
    value: Any = parse_config(None)
    for part in path.split("."):
        value = getattr(value, part)
    assert value == expected


def test_defaults_guard_both_send_routes() -> None:
    """By default both the stock and the patched send route are guarded."""
    cfg = parse_config(None)
    assert cfg.proxy.guarded_routes == DEFAULT_GUARDED_ROUTES
    assert [(r.method, r.path, r.instance_from) for r in cfg.proxy.guarded_routes] == [
        ("POST", "/send_message", "query"),
        ("POST", "/send-message/{instance_id}", "path"),
    ]


@pytest.mark.parametrize("empty", [None, {}])
def test_empty_mapping_is_all_defaults(empty: Any) -> None:
    """A missing or empty mapping means every default."""
    assert parse_config(empty) == Config()


def test_documented_file_states_the_defaults() -> None:
    """``config/supervisor.yaml`` loads and equals the built-in defaults."""
    assert load_config(DOCUMENTED) == parse_config(None)


def test_documented_file_comments_every_key() -> None:
    """Every key line of the documented file has a comment on it or on an adjacent line."""
    lines = DOCUMENTED.read_text(encoding="utf-8").splitlines()
    bare = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        near = lines[max(0, i - 1):i + 2]
        if not any("#" in n for n in near):
            bare.append(line)
    assert bare == []


# --------------------------------------------------------------------------- bad inputs

BAD = [
    # (mapping, the key path one error line must start with)
    pytest.param({"queue": {"max_retries": -1}}, "queue.max_retries:", id="negative-int"),
    pytest.param({"queue": {"max_queue_size": 0}}, "queue.max_queue_size:", id="below-ge-1"),
    pytest.param({"queue": {"processing_timeout_s": 0}}, "queue.processing_timeout_s:",
                 id="not-gt-0"),
    pytest.param({"bogus": 1}, "bogus:", id="unknown-top-level-key"),
    pytest.param({"queue": {"max_retrys": 3}}, "queue.max_retrys:", id="unknown-nested-key"),
    pytest.param({"monitoring": {"healthy": {"min_rate": 1}}}, "monitoring.healthy.min_rate:",
                 id="unknown-deep-key"),
    pytest.param({"queue": {"max_retries": "3"}}, "queue.max_retries:", id="string-for-int"),
    pytest.param({"queue": {"max_retries": True}}, "queue.max_retries:", id="bool-for-int"),
    pytest.param({"queue": {"max_retries": 1.5}}, "queue.max_retries:", id="float-for-int"),
    pytest.param({"session": {"conflict_delay_s": "30s"}}, "session.conflict_delay_s:",
                 id="string-for-float"),
    pytest.param({"listen": {"port": False}}, "listen.port:", id="bool-for-port"),
    pytest.param({"queue": [1, 2]}, "queue:", id="list-for-mapping"),
    pytest.param({"monitoring": {"healthy": "ok"}}, "monitoring.healthy:",
                 id="string-for-nested-mapping"),
    pytest.param({"log_source": {"command": "node app.js"}}, "log_source.command:",
                 id="string-for-list"),
    pytest.param({"auth": {"tokens": {"68B2F1A0C3D4E": "a1b2"}}}, "auth.tokens.68B2F1A0C3D4E:",
                 id="string-for-token-list"),
    pytest.param({"log_source": {"type": "ftp"}}, "log_source.type:", id="literal-type"),
    pytest.param({"log_source": {"type": True}}, "log_source.type:", id="literal-yaml-bool"),
    pytest.param({"queue": {"on_unknown": "maybe"}}, "queue.on_unknown:", id="literal-unknown"),
    pytest.param({"queue": {"batch_size": 2}}, "queue.batch_size:", id="batch-size-2"),
    pytest.param({"upstream": {"url": "ftp://127.0.0.1:8000"}}, "upstream.url:",
                 id="url-scheme"),
    pytest.param({"upstream": {"url": "127.0.0.1:8000"}}, "upstream.url:", id="url-no-scheme"),
    pytest.param({"upstream": {"url": "http://"}}, "upstream.url:", id="url-no-host"),
    pytest.param({"auth": {"mode": "none"}, "listen": {"host": "0.0.0.0"}}, "auth.mode:",
                 id="auth-none-public"),
    pytest.param({"auth": {"mode": "none"}, "listen": {"host": "192.168.1.10"}}, "auth.mode:",
                 id="auth-none-lan"),
    pytest.param({"auth": {"mode": "tokens"}}, "auth.tokens:", id="tokens-without-tokens"),
    pytest.param({"limits": {"instance_id_pattern": "([0-9A-Z]"}}, "limits.instance_id_pattern:",
                 id="bad-id-regex"),
    pytest.param({"parser": {"rules": [{"name": "x", "pattern": "(?P<code", "event": "ready"}]}},
                 "parser.rules[0].pattern:", id="bad-rule-regex"),
    pytest.param({"parser": {"rules": [{"name": "x", "pattern": "y", "event": "online"}]}},
                 "parser.rules[0].event:", id="bad-rule-event"),
    pytest.param({"proxy": {"guarded_routes": [
        {"method": "POST", "path": "/send-message", "instance_from": "path"}]}},
        "proxy.guarded_routes[0].path:", id="path-route-without-placeholder"),
    pytest.param({"proxy": {"guarded_routes": [
        {"method": "POST", "path": "send_message", "instance_from": "query"}]}},
        "proxy.guarded_routes[0].path:", id="route-without-slash"),
    pytest.param({"log_source": {"type": "command"}}, "log_source.command:",
                 id="command-without-argv"),
    pytest.param({"log_source": {"type": "journald"}}, "log_source.unit:",
                 id="journald-without-unit"),
    pytest.param({"monitoring": {"warning": {"min_success_rate": 90}}},
                 "monitoring.warning.min_success_rate:", id="warning-above-healthy"),
    pytest.param({"listen": {"port": 70000}}, "listen.port:", id="port-above-65535"),
    pytest.param({"queue": {"jitter": 1.5}}, "queue.jitter:", id="jitter-above-1"),
]


@pytest.mark.parametrize(("mapping", "key_path"), BAD)
def test_bad_input_names_its_key_path(mapping: dict[str, Any], key_path: str) -> None:
    """Each invalid value is refused with an error line that starts with its key path."""
    errors = _errors(mapping)
    assert any(line.startswith(key_path + " ") for line in errors), errors


def test_error_line_says_what_is_expected() -> None:
    """The error reads like the documented example: key path, requirement, offending value."""
    assert _errors({"queue": {"max_retries": -1}}) == [
        "queue.max_retries: must be an integer >= 0, got -1"]


def test_unknown_key_error_lists_the_known_keys() -> None:
    """An unknown key's error names the keys that are valid at that place."""
    (line,) = _errors({"session": {"conflict_delay": 30}})
    assert line.startswith("session.conflict_delay: unknown key")
    assert "conflict_delay_s" in line


@pytest.mark.parametrize("top", [[1, 2], "listen", 3])
def test_top_level_must_be_a_mapping(top: Any) -> None:
    """A YAML document that is not a mapping is refused."""
    (line,) = _errors(top)
    assert line.startswith("the top level: must be a mapping")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.53"])
def test_auth_none_is_accepted_on_loopback(host: str) -> None:
    """``auth.mode: none`` is allowed when the listen address is a loopback one."""
    cfg = parse_config({"auth": {"mode": "none"}, "listen": {"host": host}})
    assert (cfg.auth.mode, cfg.listen.host) == ("none", host)


def test_tokens_mode_with_a_token_map_is_accepted() -> None:
    """``auth.mode: tokens`` with a token list per instance is valid and kept as tuples."""
    cfg = parse_config({"auth": {"mode": "tokens", "tokens": {"68B2F1A0C3D4E": ["a1b2c3d4e5f60"]}}})
    assert cfg.auth.tokens == {"68B2F1A0C3D4E": ("a1b2c3d4e5f60",)}


def test_int_is_accepted_where_a_number_is_expected() -> None:
    """An integer YAML value is accepted for a float key and converted."""
    cfg = parse_config({"queue": {"retry_delay_s": 7}})
    assert cfg.queue.retry_delay_s == 7.0
    assert isinstance(cfg.queue.retry_delay_s, float)


def test_several_type_errors_are_all_reported() -> None:
    """Every problem of a file is reported at once, one line each."""
    errors = _errors({
        "bogus": 1,
        "listen": {"port": "http"},
        "queue": {"max_retries": -1, "on_unknown": "maybe", "typo": 2},
        "session": [],
    })
    starts = sorted(line.split(":", 1)[0] for line in errors)
    assert starts == ["bogus", "listen.port", "queue.max_retries", "queue.on_unknown",
                      "queue.typo", "session"]


def test_several_cross_field_errors_are_all_reported() -> None:
    """Format and cross-field checks report every problem, not just the first."""
    errors = _errors({
        "upstream": {"url": "ftp://x"},
        "queue": {"batch_size": 2},
        "auth": {"mode": "tokens"},
        "limits": {"instance_id_pattern": "("},
    })
    starts = sorted(line.split(":", 1)[0] for line in errors)
    assert starts == ["auth.tokens", "limits.instance_id_pattern", "queue.batch_size",
                      "upstream.url"]


def test_type_errors_and_cross_field_errors_are_reported_together() -> None:
    """A file with a bad number and a bad URL names both keys (every error, not the first only)."""
    errors = _errors({"queue": {"max_retries": -1}, "upstream": {"url": "ftp://x"}})
    starts = sorted(line.split(":", 1)[0] for line in errors)
    assert starts == ["queue.max_retries", "upstream.url"]


# --------------------------------------------------------------------------- load_config


def test_load_config_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the file and the reason."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.errors
    assert str(path) in line
    assert "cannot read" in line
    assert "No such file" in line


def test_load_config_directory(tmp_path: Path) -> None:
    """A directory given as the file is a ConfigError, not a crash."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert "cannot read" in info.value.errors[0]


@pytest.mark.parametrize(
    ("text", "line_no"),
    [
        ("listen:\n  host: 127.0.0.1\nqueue:\n  max_retries: 3\n   bad: 1\n", 5),
        ("queue:\n\tmax_retries: 3\n", 2),
        ("state_dir: /tmp\nlisten: {host: 127.0.0.1\n", 3),
    ],
)
def test_load_config_invalid_yaml_names_the_line(tmp_path: Path, text: str, line_no: int) -> None:
    """Invalid YAML is a ConfigError that names the line of the problem."""
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.errors
    assert line.startswith(f"{path}: not valid YAML")
    assert f"line {line_no}," in line


def test_load_config_non_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError that says so."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("state_dir: /var/lib/bläst\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.errors
    assert "not UTF-8" in line
    assert str(path) in line


def test_load_config_empty_file_is_defaults(tmp_path: Path) -> None:
    """An empty file means all defaults."""
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    assert load_config(path) == Config()


def test_load_config_reports_key_paths(tmp_path: Path) -> None:
    """A well-formed file with bad values gives the same key-path errors as parse_config."""
    path = tmp_path / "values.yaml"
    path.write_text("queue:\n  max_retries: -1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ["queue.max_retries: must be an integer >= 0, got -1"]


# --------------------------------------------------------------------------- the CLI


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "check-config", "-c", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def test_cli_check_config_accepts_the_documented_file() -> None:
    """``check-config`` exits 0 for ``config/supervisor.yaml``."""
    proc = _check_config(DOCUMENTED)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "OK" in proc.stdout


def test_cli_check_config_refuses_a_bad_file(tmp_path: Path) -> None:
    """``check-config`` exits 2 and prints one line per error on stderr."""
    path = tmp_path / "bad.yaml"
    path.write_text("bogus: 1\nqueue:\n  max_retries: -1\n  on_unknown: maybe\n",
                    encoding="utf-8")
    proc = _check_config(path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, proc.stderr
    assert sorted(line.removeprefix(f"{path}: ").split(":", 1)[0] for line in lines) == [
        "bogus", "queue.max_retries", "queue.on_unknown"]


def test_cli_check_config_invalid_yaml(tmp_path: Path) -> None:
    """``check-config`` exits 2 on invalid YAML with one line naming the line number."""
    path = tmp_path / "broken.yaml"
    path.write_text("queue:\n\tmax_retries: 3\n", encoding="utf-8")
    proc = _check_config(path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "line 2" in line


# --------------------------------------------------------------------------- the reload plan


@pytest.mark.parametrize(("change", "restart"), [
    ({"queue": {"max_queue_size": 5}}, []),
    ({"monitoring": {"healthy": {"max_queue": 1, "min_success_rate": 90}}}, []),
    ({"auth": {"mode": "none"}}, []),
    ({"parser": {"rules": [{"name": "r", "pattern": "x", "event": "ready"}]}}, []),
    ({"listen": {"port": 9}}, ["listen"]),
    ({"state_dir": "/elsewhere"}, ["state_dir"]),
    ({"log_source": {"type": "stdin"}}, ["log_source"]),
    ({"upstream": {"url": "http://127.0.0.1:9000"}}, ["upstream"]),
    ({"limits": {"max_body_bytes": 10, "instance_id_pattern": "^[A-Z]+$"}},
     ["limits.max_body_bytes"]),
    ({"logging": {"format": "json"}}, ["logging"]),
])
def test_reload_plan_names_what_needs_a_restart(change: dict[str, Any],
                                                restart: list[str]) -> None:
    """Restart-only keys are named and keep their running value; the rest is applied."""
    old = parse_config(None)
    new = parse_config(change)
    effective, needs = reload_plan(old, new)
    assert needs == restart
    for key in needs:
        section, _, field = key.partition(".")
        if field:
            assert getattr(getattr(effective, section), field) == \
                getattr(getattr(old, section), field)
        else:
            assert getattr(effective, section) == getattr(old, section)
    if not needs:
        assert effective == new
    if "limits" in change:
        assert effective.limits.instance_id_pattern == "^[A-Z]+$"


def test_reload_cannot_turn_off_auth_on_a_public_listener() -> None:
    """A reloaded file that moves to loopback *and* sets auth.mode none is refused: the
    listener keeps its public address until a restart, so the mix must be checked again."""
    old = parse_config({"listen": {"host": "0.0.0.0"}, "auth": {"mode": "upstream"}})
    new = parse_config({"listen": {"host": "127.0.0.1"}, "auth": {"mode": "none"}})
    effective, restart = reload_plan(old, new)
    assert effective.listen.host == "0.0.0.0"
    assert "listen" in " ".join(restart)
    problems = validate(effective)
    assert any(p.startswith("auth.mode:") for p in problems), problems
