"""Configuration: a tree of frozen dataclasses built by one pure function.

``parse_config(mapping)`` turns the YAML mapping into a :class:`Config` or raises
:class:`ConfigError` carrying one message per problem, each naming its key path
(``queue.max_retries: must be an integer >= 0, got -1``). Unknown keys are errors.
``load_config(path)`` reads the file around it. No side effects, no ``sys.exit``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import ipaddress
import re
import types
import typing
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

# pm2 ``--time`` (and ``log_date_format: YYYY-MM-DDTHH:mm:ss``) prefixes every line with
# ``2025-07-23T05:41:01: ``; fractions and a zone are accepted too.
PM2_TIME_PREFIX = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?: "


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _meta(*, ge: float | None = None, gt: float | None = None,
          le: float | None = None) -> dict[str, Any]:
    return {"ge": ge, "gt": gt, "le": le}


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where the proxy and the supervisor API listen."""

    host: str = "127.0.0.1"
    port: int = field(default=8001, metadata=_meta(ge=0, le=65535))


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """The api-blast server the proxy forwards to."""

    url: str = "http://127.0.0.1:8000"
    connect_timeout_s: float = field(default=5.0, metadata=_meta(gt=0))
    # Node's http server closes idle keep-alive connections after 5 s; reusing one that it is
    # closing at that instant fails the request. Staying under 5 s avoids the race.
    keepalive_timeout_s: float = field(default=4.0, metadata=_meta(ge=0))
    pass_through_timeout_s: float = field(default=120.0, metadata=_meta(gt=0))


@dataclass(frozen=True, slots=True)
class LogSourceConfig:
    """Where api-blast's console output is read from."""

    type: Literal["file", "command", "journald", "stdin"] = "file"
    path: str = "/var/log/api-blast/app.log"
    command: tuple[str, ...] = ()
    cwd: str | None = None
    unit: str | None = None
    # Where to begin reading a file seen for the first time: its current end, or its start.
    start_at: Literal["end", "start"] = "end"
    # type file: several files or globs (pm2's -out.log and -error.log); replaces ``path``.
    paths: tuple[str, ...] = ()
    # Stripped from the start of every line before assembly (pm2 --time adds
    # ``2025-07-23T05:41:01: ``); "" strips nothing.
    line_prefix: str = PM2_TIME_PREFIX
    # An unfinished multi-line record is given up this long after its last line.
    record_timeout_s: float = field(default=2.0, metadata=_meta(gt=0, le=600))
    max_record_lines: int = field(default=400, metadata=_meta(ge=1))
    # A longer line keeps its first max_line_bytes; the rest is skipped (bounded memory).
    max_line_bytes: int = field(default=1_048_576, metadata=_meta(ge=1024))
    # type file: look at the files this often even without a change notification.
    poll_interval_s: float = field(default=1.0, metadata=_meta(gt=0, le=60))
    # type command: restart backoff after the child exits (doubling up to the maximum), and
    # how long it gets after SIGTERM before SIGKILL.
    restart_delay_s: float = field(default=1.0, metadata=_meta(ge=0))
    max_restart_delay_s: float = field(default=60.0, metadata=_meta(ge=0))
    stop_timeout_s: float = field(default=10.0, metadata=_meta(gt=0))


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Replay of held sends: pacing, timeouts, retries."""

    max_retries: int = field(default=3, metadata=_meta(ge=0))
    retry_delay_s: float = field(default=5.0, metadata=_meta(ge=0))
    max_retry_delay_s: float = field(default=300.0, metadata=_meta(ge=0))
    # Each backoff is multiplied by a random factor in [1 - jitter, 1 + jitter].
    jitter: float = field(default=0.2, metadata=_meta(ge=0, le=1))
    max_queue_size: int = field(default=100, metadata=_meta(ge=1))
    processing_timeout_s: float = field(default=30.0, metadata=_meta(gt=0))
    batch_size: int = field(default=1, metadata=_meta(ge=1))
    process_interval_s: float = field(default=2.0, metadata=_meta(ge=0))
    on_unknown: Literal["retry", "fail"] = "retry"
    # Finished rows (delivered, cancelled) are deleted this long after they finished.
    retention_s: float = field(default=604_800.0, metadata=_meta(gt=0))
    # Dead rows wait for an admin decision: kept for ever unless this is set.
    dead_retention_s: float | None = field(default=None, metadata=_meta(gt=0))
    prune_interval_s: float = field(default=300.0, metadata=_meta(gt=0))


@dataclass(frozen=True, slots=True)
class WarmupConfig:
    """A new number's daily cap: ``start_per_day`` on its first day, times ``factor`` each day
    after, up to ``pacing.daily_cap``."""

    start_per_day: int = field(default=20, metadata=_meta(ge=1))
    factor: float = field(default=1.5, metadata=_meta(ge=1))
    # The number's first day (YYYY-MM-DD, in pacing.timezone); None: the day of the first
    # send the supervisor sees for it (kept in the journal).
    since: str | None = None


@dataclass(frozen=True, slots=True)
class QuietHoursConfig:
    """A daily window (local time, HH:MM, in pacing.timezone) in which nothing is sent; it may
    cross midnight (22:00 to 07:00)."""

    start: str = "22:00"
    end: str = "07:00"


@dataclass(frozen=True, slots=True)
class PacingRules:
    """What keeps a number from looking like a spammer; every key may be set per instance."""

    # [min, max]: a uniform random gap between two sends of an instance; None: the fixed
    # queue.process_interval_s.
    interval_s: tuple[float, ...] | None = None
    # Sends per rolling 24 h; beyond it sends are journaled and held until the window allows.
    daily_cap: int | None = field(default=None, metadata=_meta(ge=1))
    warmup: WarmupConfig | None = None
    quiet_hours: QuietHoursConfig | None = None


@dataclass(frozen=True, slots=True)
class PacingConfig(PacingRules):
    """Ban-safe pacing, for every instance, with per-instance overrides."""

    timezone: str = "UTC"  # an IANA name (Asia/Jakarta) for quiet hours and warm-up days
    # instance id -> the keys that differ for it (a key not given keeps the value above).
    instances: Mapping[str, PacingRules] = field(default_factory=dict)


WEBHOOK_EVENTS = ("message.delivered", "message.dead", "message.cancelled", "session.changed")


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """One receiver of outcome webhooks."""

    name: str = ""  # unique; names the endpoint in metrics, the API and the logs
    url: str = ""
    # Standard Webhooks secret: "whsec_" and base64 (the receiver verifies with it).
    secret: str = ""
    events: tuple[str, ...] = WEBHOOK_EVENTS
    instances: tuple[str, ...] = ()  # only these instances (empty: every instance)
    max_in_flight: int = field(default=4, metadata=_meta(ge=1))


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    """Outcome webhooks: written in the journal with the change they report, delivered after
    it, retried on this schedule, then kept as failed (listed, replayable)."""

    endpoints: tuple[WebhookEndpoint, ...] = ()
    retry_schedule_s: tuple[float, ...] = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0)
    timeout_s: float = field(default=10.0, metadata=_meta(gt=0))


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """How session signals are turned into holds."""

    check_interval_s: float = field(default=60.0, metadata=_meta(gt=0))
    conflict_delay_s: float = field(default=30.0, metadata=_meta(ge=0))
    connection_timeout_s: float = field(default=120.0, metadata=_meta(gt=0))
    keepalive_s: float = field(default=45.0, metadata=_meta(gt=0))
    # A "not sent" answer with a drop signal of the instance this close before or after it
    # blames the session (held, not counted); without one it counts against the message.
    drop_window_s: float = field(default=3.0, metadata=_meta(ge=0, le=300))
    # This many "not sent" answers in a row (nothing delivered between them) blame the
    # session even without a drop signal: it is held and probed (a silent outage).
    not_sent_streak: int = field(default=3, metadata=_meta(ge=1))


@dataclass(frozen=True, slots=True)
class Threshold:
    """A health band: success rate in percent and queue depth."""

    min_success_rate: float = field(default=80.0, metadata=_meta(ge=0))
    max_queue: int = field(default=10, metadata=_meta(ge=0))


@dataclass(frozen=True, slots=True)
class MonitoringConfig:
    """Health thresholds; below the warning band an instance is critical."""

    healthy: Threshold = Threshold(80.0, 10)
    warning: Threshold = Threshold(60.0, 20)
    window_s: float = field(default=3600.0, metadata=_meta(gt=0))
    # A queue deeper than healthy.max_queue that grew over this span while the session was
    # ready makes the "backlog growing" recommendation.
    backlog_window_s: float = field(default=300.0, metadata=_meta(gt=0, le=86400))


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Who may have a send journaled."""

    mode: Literal["upstream", "tokens", "none"] = "upstream"
    # instance id -> accepted access tokens (mode: tokens)
    tokens: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # An accepted pair is re-checked in the background when its last check is older.
    cache_ttl_s: float = field(default=300.0, metadata=_meta(ge=0))
    # An accepted pair is trusted this long after api-blast last accepted it (30 days),
    # across api-blast outages and daemon restarts, until api-blast refuses it.
    trust_ttl_s: float = field(default=2_592_000.0, metadata=_meta(ge=0))
    negative_cache_ttl_s: float = field(default=10.0, metadata=_meta(ge=0))
    admin_token: str | None = None


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Bounds on what a client may send."""

    max_body_bytes: int = field(default=1_048_576, metadata=_meta(ge=1))
    instance_id_pattern: str = r"^[0-9A-Z]{10,20}$"
    # Bytes of live rows in the journal; beyond it new sends get 503 (nothing is dropped).
    max_journal_bytes: int = field(default=536_870_912, metadata=_meta(ge=65_536))
    # A connection idle this long, or whose request headers are still incomplete, is closed.
    idle_timeout_s: float = field(default=30.0, metadata=_meta(gt=0))
    # The body of a guarded send must arrive within this (else HTTP 408).
    body_timeout_s: float = field(default=30.0, metadata=_meta(gt=0))


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    """``Idempotency-Key`` handling of guarded sends."""

    # How long a key (and the answer stored with it) is remembered, in seconds.
    ttl_s: float = field(default=86_400.0, metadata=_meta(gt=0))


@dataclass(frozen=True, slots=True)
class GuardedRoute:
    """A send route whose requests are journaled before they are answered."""

    method: str = "POST"
    path: str = "/send_message"
    # Where the instance id is: the query parameter ``instance_id`` or the path segment
    # ``{instance_id}``.
    instance_from: Literal["query", "path"] = "query"


DEFAULT_GUARDED_ROUTES = (
    GuardedRoute("POST", "/send_message", "query"),
    GuardedRoute("POST", "/send-message/{instance_id}", "path"),
)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Which routes are guarded (everything else passes through)."""

    guarded_routes: tuple[GuardedRoute, ...] = DEFAULT_GUARDED_ROUTES
    # Headers of a guarded request kept in the journal and replayed with it.
    replay_headers: tuple[str, ...] = ("content-type", "user-agent", "accept")
    # api-blast's GET /logout checks no token: with this on, it needs the instance's valid
    # access_token (the check of a send), else 401/403 and it never reaches api-blast.
    guard_logout: bool = True
    # GET /get_qrcode deletes the instance's session even when it is connected: with this on,
    # it is refused (409) while the instance is known to be ready, unless the query says
    # force=1.
    guard_qrcode: bool = True


@dataclass(frozen=True, slots=True)
class ParserRule:
    """A console-line pattern an operator adds without a release.

    ``pattern`` is a Python regular expression searched in each record; a named group
    ``instance_id`` gives the instance, a named group ``code`` the status code. A rule named
    like a built-in one replaces it; ``event: ignore`` silences the records it matches.
    """

    name: str = ""
    pattern: str = ""
    event: Literal[
        "ready", "connecting", "conflict", "disconnected", "restart_required",
        "logged_out", "qr", "upstream_started", "ignore",
    ] = "disconnected"
    code: int | None = None


ATTRIBUTION_STRATEGIES = ("jid", "adjacent", "only_instance", "all_with_traffic")


@dataclass(frozen=True, slots=True)
class ParserConfig:
    """Extra parser rules (tried before the built-in ones) and how id-less records are
    attributed."""

    rules: tuple[ParserRule, ...] = ()
    # Strategies for records that name no instance, tried in this order.
    attribution: tuple[str, ...] = ATTRIBUTION_STRATEGIES
    # ``adjacent``: an id-bearing record at most this many records and seconds before.
    adjacent_records: int = field(default=3, metadata=_meta(ge=1))
    adjacent_window_s: float = field(default=2.0, metadata=_meta(ge=0))


@dataclass(frozen=True, slots=True)
class ProcessConfig:
    """How api-blast's Node process is found and watched (psutil)."""

    enabled: bool = True
    # Ways to find it, tried in this order; an empty one is skipped.
    pid_file: str | None = None
    port: int | None = field(default=None, metadata=_meta(ge=1, le=65535))  # None: upstream's
    cmdline: str | None = None  # a regex searched in the process's command line
    cwd: str | None = None  # its working directory
    interval_s: float = field(default=5.0, metadata=_meta(gt=0))
    # Opt-in action: SIGTERM the newest of two or more duplicate api-blast processes.
    stop_newest_duplicate: bool = False


@dataclass(frozen=True, slots=True)
class ConflictStormConfig:
    """``count`` conflicts within ``window_s`` seconds on one instance is a storm."""

    count: int = field(default=3, metadata=_meta(ge=1))
    window_s: float = field(default=300.0, metadata=_meta(gt=0))


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    """Actions taken from outside api-blast: nudges, liveness checks, child restarts."""

    nudge: bool = True
    nudge_delays_s: tuple[float, ...] = (30.0, 60.0, 120.0)
    nudge_repeat_s: float = field(default=600.0, metadata=_meta(gt=0))
    nudge_timeout_s: float = field(default=10.0, metadata=_meta(gt=0))
    connecting_grace_s: float = field(default=60.0, metadata=_meta(ge=0))
    conflict_storm: ConflictStormConfig = ConflictStormConfig()
    liveness: bool = True
    liveness_timeout_s: float = field(default=5.0, metadata=_meta(gt=0))
    down_after: int = field(default=2, metadata=_meta(ge=1))
    restart_child: bool = True
    restart_after_s: float = field(default=120.0, metadata=_meta(ge=0))
    restart_backoff_s: float = field(default=10.0, metadata=_meta(ge=0))
    restart_max_backoff_s: float = field(default=300.0, metadata=_meta(ge=0))


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """The daemon's own log (stderr, journald-friendly, or JSON lines)."""

    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    file: str | None = None  # write here instead of stderr (rotated by logrotate)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    listen: ListenConfig = ListenConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    state_dir: str = "/var/lib/blast-supervisor"
    log_source: LogSourceConfig = LogSourceConfig()
    queue: QueueConfig = QueueConfig()
    pacing: PacingConfig = PacingConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    session: SessionConfig = SessionConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    proxy: ProxyConfig = ProxyConfig()
    parser: ParserConfig = ParserConfig()
    idempotency: IdempotencyConfig = IdempotencyConfig()
    process: ProcessConfig = ProcessConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    logging: LoggingConfig = LoggingConfig()


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Convert one YAML value to ``tp``; append an error naming ``path`` on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, path, errors)
    if origin is Literal:
        if value in args:
            return value
        errors.append(f"{path}: must be {_type_name(tp)}, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if origin is tuple:
        if not isinstance(value, list):
            errors.append(f"{path}: must be a list, got {value!r}")
            return ()
        return tuple(_convert(v, args[0], f"{path}[{i}]", errors) for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is Mapping:
        if not isinstance(value, dict):
            errors.append(f"{path}: must be a mapping, got {value!r}")
            return {}
        return {str(k): _convert(v, args[1], f"{path}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    errors.append(f"{path}: must be {_type_name(tp)}, got {value!r}")
    return None


def _check_bounds(f: dataclasses.Field[Any], value: Any, path: str, errors: list[str]) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    ge, gt, le = f.metadata.get("ge"), f.metadata.get("gt"), f.metadata.get("le")
    kind = "an integer" if isinstance(value, int) else "a number"
    if ge is not None and value < ge:
        errors.append(f"{path}: must be {kind} >= {ge:g}, got {value!r}")
    if gt is not None and value <= gt:
        errors.append(f"{path}: must be {kind} > {gt:g}, got {value!r}")
    if le is not None and value > le:
        errors.append(f"{path}: must be {kind} <= {le:g}, got {value!r}")


def _build(cls: Any, mapping: Any, path: str, errors: list[str]) -> Any:
    """Build dataclass ``cls`` from ``mapping``, defaults for missing keys."""
    where = path or "the top level"
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        errors.append(f"{where}: must be a mapping of keys, got {mapping!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in fields:
            known = ", ".join(sorted(fields))
            errors.append(f"{_join(path, str(key))}: unknown key (known keys here: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in mapping:
            continue
        key_path = _join(path, name)
        before = len(errors)
        value = _convert(mapping[name], hints[name], key_path, errors)
        if len(errors) == before:
            _check_bounds(f, value, key_path, errors)
            kwargs[name] = value
    return cls(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _validate(cfg: Config, errors: list[str]) -> None:
    """Cross-field and format checks that a type alone cannot express."""
    _validate_pacing(cfg.pacing, errors)
    _validate_webhooks(cfg.webhooks, errors)
    _validate_other(cfg, errors)


def _validate_other(cfg: Config, errors: list[str]) -> None:
    up = urlsplit(cfg.upstream.url)
    if up.scheme not in ("http", "https") or not up.hostname:
        errors.append(
            f"upstream.url: must be an http:// or https:// URL such as "
            f"http://127.0.0.1:8000, got {cfg.upstream.url!r}"
        )
    if cfg.queue.batch_size != 1:
        errors.append(
            f"queue.batch_size: only 1 is supported (api-blast sends one message per request), "
            f"got {cfg.queue.batch_size}"
        )
    for name in ("instance_id_pattern",):
        try:
            re.compile(cfg.limits.instance_id_pattern)
        except re.error as exc:
            errors.append(f"limits.{name}: not a valid regular expression: {exc}")
    src = cfg.log_source
    if src.type == "command" and not src.command:
        errors.append(
            "log_source.command: required when log_source.type is 'command' "
            '(for example ["node", "app.js"])'
        )
    if src.type == "journald" and not src.unit:
        errors.append("log_source.unit: required when log_source.type is 'journald'")
    try:
        re.compile(src.line_prefix)
    except re.error as exc:
        errors.append(f"log_source.line_prefix: not a valid regular expression: {exc}")
    if src.max_restart_delay_s < src.restart_delay_s:
        errors.append("log_source.max_restart_delay_s: must not be below "
                      "log_source.restart_delay_s")
    for i, name in enumerate(cfg.parser.attribution):
        if name not in ATTRIBUTION_STRATEGIES:
            errors.append(f"parser.attribution[{i}]: unknown strategy {name!r}; use "
                          f"{', '.join(ATTRIBUTION_STRATEGIES)}")
    if len(set(cfg.parser.attribution)) != len(cfg.parser.attribution):
        errors.append("parser.attribution: a strategy is listed twice")
    if cfg.auth.mode == "none" and not _is_loopback(cfg.listen.host):
        errors.append(
            f"auth.mode: 'none' is only allowed when listen.host is a loopback address "
            f"(127.0.0.1, ::1, localhost), got listen.host {cfg.listen.host!r}; "
            f"use mode 'upstream' or 'tokens'"
        )
    if cfg.auth.mode == "tokens" and not cfg.auth.tokens:
        errors.append("auth.tokens: must list at least one instance when auth.mode is 'tokens'")
    if cfg.monitoring.warning.min_success_rate > cfg.monitoring.healthy.min_success_rate:
        errors.append(
            "monitoring.warning.min_success_rate: must not be above "
            "monitoring.healthy.min_success_rate"
        )
    seen: set[tuple[str, str]] = set()
    for i, route in enumerate(cfg.proxy.guarded_routes):
        where = f"proxy.guarded_routes[{i}]"
        if not route.path.startswith("/"):
            errors.append(f"{where}.path: must start with '/', got {route.path!r}")
        if route.instance_from == "path" and "{instance_id}" not in route.path:
            errors.append(
                f"{where}.path: must contain {{instance_id}} when instance_from is 'path'")
        if (route.method.upper(), route.path) in seen:
            errors.append(f"{where}: listed twice")
        seen.add((route.method.upper(), route.path))
    for i, rule in enumerate(cfg.parser.rules):
        where = f"parser.rules[{i}]"
        if not rule.name:
            errors.append(f"{where}.name: required")
        try:
            re.compile(rule.pattern)
        except re.error as exc:
            errors.append(f"{where}.pattern: not a valid regular expression: {exc}")
        if not rule.pattern:
            errors.append(f"{where}.pattern: required")
    _validate_service(cfg, errors)


def _validate_service(cfg: Config, errors: list[str]) -> None:
    """Checks of the ``process`` and ``recovery`` sections."""
    if cfg.process.cmdline is not None:
        try:
            re.compile(cfg.process.cmdline)
        except re.error as exc:
            errors.append(f"process.cmdline: not a valid regular expression: {exc}")
    rec = cfg.recovery
    if not rec.nudge_delays_s:
        errors.append("recovery.nudge_delays_s: must list at least one delay, e.g. [30, 60, 120]")
    for i, delay in enumerate(rec.nudge_delays_s):
        if isinstance(delay, float) and delay <= 0:
            errors.append(f"recovery.nudge_delays_s[{i}]: must be a number > 0, got {delay!r}")
    if rec.restart_max_backoff_s < rec.restart_backoff_s:
        errors.append("recovery.restart_max_backoff_s: must not be below "
                      "recovery.restart_backoff_s")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(cfg: Config) -> list[str]:
    """The cross-field problems of an already built configuration (used on reload, where
    restart-only keys keep their running value and the mix must be checked again)."""
    errors: list[str] = []
    _validate(cfg, errors)
    return errors


def parse_config(mapping: Any) -> Config:
    """Build a :class:`Config` from a parsed YAML mapping (``None`` means all defaults)."""
    errors: list[str] = []
    cfg: Config = _build(Config, mapping, "", errors)
    # Keys with a type error kept their default, so the cross-field checks still make sense;
    # running them too reports every problem of a file at once.
    _validate(cfg, errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and parse a YAML file; every failure becomes a :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read the configuration file: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{p}: not valid YAML{where}: {problem}"]) from exc
    return parse_config(data)


# Settings read once at startup: a reload that changes them is applied only by a restart.
RESTART_ONLY = ("listen", "state_dir", "log_source", "upstream", "logging",
                "limits.max_body_bytes", "limits.idle_timeout_s", "proxy.guarded_routes",
                "process.enabled")


def reload_plan(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The configuration to apply on reload, and the changed keys that need a restart
    (those keep their running value until then)."""
    changed: list[str] = []
    effective = new
    for key in RESTART_ONLY:
        section, _, name = key.partition(".")
        old_v, new_v = getattr(old, section), getattr(new, section)
        if name:
            old_f, new_f = getattr(old_v, name), getattr(new_v, name)
            if old_f != new_f:
                changed.append(key)
                new_v = dataclasses.replace(new_v, **{name: old_f})
                effective = dataclasses.replace(effective, **{section: new_v})
        elif old_v != new_v:
            changed.append(key)
            effective = dataclasses.replace(effective, **{section: old_v})
    return effective, changed


def _validate_pacing(p: PacingConfig, errors: list[str]) -> None:
    try:
        zoneinfo.ZoneInfo(p.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        errors.append(f"pacing.timezone: unknown time zone {p.timezone!r}; use an IANA name "
                      f"such as 'UTC' or 'Asia/Jakarta'")
    for path, rules in [("pacing", p), *((f"pacing.instances.{k}", v)
                                         for k, v in p.instances.items())]:
        iv = rules.interval_s
        if iv is not None and (len(iv) != 2 or iv[0] < 0 or iv[0] > iv[1]):
            errors.append(f"{path}.interval_s: must be [min, max] with 0 <= min <= max "
                          f"(seconds), got {list(iv)!r}")
        if rules.quiet_hours is not None:
            for end in ("start", "end"):
                value = getattr(rules.quiet_hours, end)
                if parse_hhmm(value) is None:
                    errors.append(f"{path}.quiet_hours.{end}: must be a time HH:MM such as "
                                  f"'22:00', got {value!r}")
        if rules.warmup is not None and rules.warmup.since is not None:
            try:
                datetime.date.fromisoformat(rules.warmup.since)
            except ValueError:
                errors.append(f"{path}.warmup.since: must be a date YYYY-MM-DD, got "
                              f"{rules.warmup.since!r}")
    if p.warmup is not None and p.daily_cap is None:
        errors.append("pacing.warmup: needs pacing.daily_cap (the cap the warm-up grows to)")


def parse_hhmm(text: str) -> int | None:
    """Minutes after midnight of ``HH:MM``, or None when it is not such a time."""
    m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", text)
    return None if m is None else int(m.group(1)) * 60 + int(m.group(2))


def _validate_webhooks(w: WebhooksConfig, errors: list[str]) -> None:
    names = [e.name for e in w.endpoints]
    for i, e in enumerate(w.endpoints):
        path = f"webhooks.endpoints[{i}]"
        if not e.name:
            errors.append(f"{path}.name: required (it names the endpoint in metrics and logs)")
        elif names.count(e.name) > 1:
            errors.append(f"{path}.name: {e.name!r} is used by another endpoint")
        url = urlsplit(e.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            errors.append(f"{path}.url: must be an http:// or https:// URL, got {e.url!r}")
        if not _webhook_secret(e.secret):
            errors.append(f"{path}.secret: must be a Standard Webhooks secret: 'whsec_' then "
                          f"base64 of 24 to 64 random bytes (openssl rand -base64 32)")
        for event in e.events:
            if event not in WEBHOOK_EVENTS:
                errors.append(f"{path}.events: unknown event {event!r}; use "
                              f"{', '.join(WEBHOOK_EVENTS)}")
    if not w.retry_schedule_s or any(s < 0 for s in w.retry_schedule_s):
        errors.append("webhooks.retry_schedule_s: must list one or more delays >= 0 (seconds)")


def _webhook_secret(secret: str) -> bool:
    if not secret.startswith("whsec_"):
        return False
    try:
        key = base64.b64decode(secret[6:], validate=True)
    except ValueError:
        return False
    return 24 <= len(key) <= 64
