"""Command-line tools that talk to a running daemon over its HTTP API.

* ``status [INSTANCE]`` — a table of instances; the exit code is the health (0 healthy,
  1 warning, 2 critical, 3 daemon unreachable or instance unknown: the Nagios convention).
* ``test-success-rate INSTANCE_ID CHAT_ID [COUNT] [INTERVAL_MS]`` — sends COUNT messages
  through the proxy, follows each one to its final state and reports the real success rate.
* ``queue list | requeue | cancel`` — the journal's messages, and the admin actions on them.

The formatting functions are pure (values in, lines out); the ``run_*`` functions do the IO.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from .health import duration

EXIT_HEALTHY = 0
EXIT_WARNING = 1
EXIT_CRITICAL = 2
EXIT_UNKNOWN = 3  # the daemon cannot be reached, or the instance is unknown

HEALTH_EXIT = {"healthy": EXIT_HEALTHY, "warning": EXIT_WARNING, "critical": EXIT_CRITICAL}
FINAL_STATES = ("delivered", "dead", "cancelled")
POLL_S = 0.25  # how often test-success-rate asks for the state of its messages


class DaemonError(Exception):
    """The daemon could not be asked; the message says what to check."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where the daemon is and the tokens the tools may use."""

    url: str  # base URL, e.g. http://127.0.0.1:8001
    admin_token: str | None = None
    access_token: str | None = None
    timeout_s: float = 10.0


def base_url(host: str, port: int) -> str:
    """The URL to reach a daemon listening on ``host:port`` from this machine."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class Client:
    """Blocking JSON calls to the daemon."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: Mapping[str, str] | None = None, admin: bool = False
             ) -> tuple[int, dict[str, str], Any]:
        """``(status, headers, decoded JSON or None)``; raises :class:`DaemonError` when the
        daemon does not answer."""
        hdrs = dict(headers or {})
        if admin:
            if not self.target.admin_token:
                raise DaemonError(
                    "no admin token: pass --admin-token, set BLAST_SUPERVISOR_ADMIN_TOKEN, or "
                    "give the daemon's configuration with -c (auth.admin_token)")
            hdrs["Authorization"] = f"Bearer {self.target.admin_token}"
        url = self.target.url.rstrip("/") + path
        req = urllib.request.Request(url, data=body, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=self.target.timeout_s) as resp:
                status, out_headers, raw = resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            status, out_headers, raw = exc.code, dict(exc.headers), exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DaemonError(
                f"cannot reach blast-supervisor at {self.target.url} ({reason}): is it running? "
                f"(--url, or -c with its configuration)") from exc
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        return status, out_headers, doc

    def get(self, path: str) -> Any:
        """GET a JSON document; a non-2xx answer is a :class:`DaemonError`."""
        status, _, doc = self.call("GET", path)
        if not 200 <= status < 300:
            raise DaemonError(f"GET {path}: HTTP {status}: {_message(doc)}")
        return doc


def _message(doc: Any) -> str:
    if isinstance(doc, dict):
        return str(doc.get("message") or doc.get("error") or doc)
    return str(doc)


# --------------------------------------------------------------------------- formatting


def pct(value: float | None) -> str:
    """``80.0 %`` or ``-`` when there is no figure."""
    return "-" if value is None else f"{value:.1f} %"


def table(header: Sequence[str], rows: Iterable[Sequence[str]],
          right: frozenset[int] = frozenset()) -> list[str]:
    """Columns padded to their widest cell; columns in ``right`` are right-aligned."""
    rows = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = []
    for r in rows:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                 for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
    return out


def status_lines(view: Mapping[str, Any], url: str, instance_id: str | None = None
                 ) -> list[str]:
    """The ``status`` report of a ``/supervisor/instances`` answer."""
    o = view["overall"]
    instances = [i for i in view["instances"]
                 if instance_id is None or i["instance_id"] == instance_id]
    window = duration(o["stats"]["window_s"])
    lines = [f"blast-supervisor at {url}: {o['health']} — {o['ready']}/{o['instances']} "
             f"instances ready, {o['queued']} queued, {o['dead']} dead, success "
             f"{pct(o['success_rate'])} over {window} "
             f"(first attempt {pct(o['first_attempt_rate'])}, since start "
             f"{pct(o['stats']['total']['success_rate'])})"]
    for name, problem in sorted(view.get("problems", {}).items()):
        lines.append(f"problem: {name}: {problem}")
    lines.append("")
    rows = []
    for i in instances:
        s, q, st = i["session"], i["queue"], i["stats"]
        since = f" {duration(s['since_s'])}" if s.get("since_s") is not None else ""
        code = f" ({s['code']})" if s.get("code") else ""
        rows.append([i["instance_id"], f"{s['state']}{code}{since}", i["health"],
                     str(q["queued"]), str(q["retrying"]), str(q["in_flight"]), str(q["dead"]),
                     pct(i["success_rate"]), pct(i["first_attempt_rate"]),
                     pct(st["total"]["success_rate"]), str(s["conflicts_window"])])
    if rows:
        lines += table(["INSTANCE", "SESSION", "HEALTH", "QUEUED", "RETRY", "SENDING", "DEAD",
                        f"SUCCESS {window}", "FIRST TRY", "SINCE START", "440s"], rows,
                       right=frozenset(range(3, 11)))
    else:
        lines.append("no instance seen yet" if instance_id is None
                     else f"instance {instance_id} is not known to the supervisor")
    recs = [r for i in instances for r in i["recommendations"]]
    if recs:
        lines += ["", "recommendations:"]
        lines += [f"  [{r['severity']}] {r['instance_id']}: {r['text']}" for r in recs]
    return lines


def messages_lines(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """``queue list``: one line per message, newest first."""
    if not messages:
        return ["no message"]
    rows = [[m["message_id"], m["instance_id"], m["state"], str(m["attempts"]),
             (m["updated_at"] or "-").replace("T", " "), (m["last_error"] or "")[:80]]
            for m in messages]
    return table(["MESSAGE", "INSTANCE", "STATE", "ATTEMPTS", "UPDATED", "LAST ERROR"], rows,
                 right=frozenset({3}))


# --------------------------------------------------------------------------- status


def run_status(client: Client, instance_id: str | None, out: TextIO) -> int:
    """Print the status table; the exit code is the (instance's or overall) health."""
    try:
        view = client.get("/supervisor/instances")
    except DaemonError as exc:
        print(f"status: {exc}", file=out)
        return EXIT_UNKNOWN
    for line in status_lines(view, client.target.url, instance_id):
        print(line, file=out)
    if instance_id is None:
        return HEALTH_EXIT.get(view["overall"]["health"], EXIT_UNKNOWN)
    for i in view["instances"]:
        if i["instance_id"] == instance_id:
            return HEALTH_EXIT.get(i["health"], EXIT_UNKNOWN)
    return EXIT_UNKNOWN


# --------------------------------------------------------------------------- test-success-rate


@dataclass(slots=True)
class Tracked:
    """One test message, from its send to its final state."""

    index: int
    sent_at: float
    answer: str  # what the send's answer said ("delivered at once", "queued", "refused ...")
    message_id: str | None = None
    state: str | None = None  # final state (delivered, dead, cancelled) once known
    attempts: int = 0
    last_error: str | None = None
    finished_at: float | None = None

    @property
    def open(self) -> bool:
        """Accepted by the supervisor and not final yet."""
        return self.message_id is not None and self.state is None


@dataclass(frozen=True, slots=True)
class RunResult:
    """The figures of a test run."""

    count: int
    delivered: int
    first_attempt: int
    dead: int
    still_queued: int
    refused: int

    @property
    def success_rate(self) -> float:
        """Percent of the messages sent that were delivered."""
        return 100.0 * self.delivered / self.count if self.count else 0.0

    @property
    def first_attempt_rate(self) -> float:
        """Percent delivered by their first attempt (what api-blast alone would have done)."""
        return 100.0 * self.first_attempt / self.count if self.count else 0.0


def summarize(tracked: Sequence[Tracked]) -> RunResult:
    """The figures of a run (``first_attempt``: delivered after exactly one real send)."""
    delivered = [t for t in tracked if t.state == "delivered"]
    return RunResult(
        count=len(tracked), delivered=len(delivered),
        first_attempt=sum(1 for t in delivered if t.attempts == 1),
        dead=sum(1 for t in tracked if t.state in ("dead", "cancelled")),
        still_queued=sum(1 for t in tracked if t.open),
        refused=sum(1 for t in tracked if t.message_id is None))


def result_lines(r: RunResult) -> list[str]:
    """The closing lines of ``test-success-rate``."""
    return [f"result: {r.delivered}/{r.count} delivered ({r.success_rate:.1f} %), "
            f"{r.first_attempt}/{r.count} on the first attempt ({r.first_attempt_rate:.1f} %), "
            f"{r.dead} dead, {r.still_queued} still queued, {r.refused} refused",
            f"success rate: {r.success_rate:.1f} %"]


def _short(message_id: str | None) -> str:
    return (message_id or "-")[:12]


def send_test_message(client: Client, instance_id: str, chat_id: str, caption: str,
                      index: int, now: float) -> Tracked:
    """One guarded send through the proxy; what its answer says."""
    query = {"instance_id": instance_id}
    if client.target.access_token:
        query["access_token"] = client.target.access_token
    body = urllib.parse.urlencode({"chat_id": chat_id, "caption": caption}).encode()
    status, headers, doc = client.call(
        "POST", "/send_message?" + urllib.parse.urlencode(query), body,
        {"Content-Type": "application/x-www-form-urlencoded"})
    mid = headers.get("X-Supervisor-Message-Id")
    if status == 200 and mid:
        return Tracked(index, now, "delivered at once", mid)
    if status == 202 and mid:
        position = doc.get("position") if isinstance(doc, dict) else None
        return Tracked(index, now, f"queued (position {position})", mid)
    if mid:  # accepted, but the first attempt's answer was an error (502): followed anyway
        return Tracked(index, now, f"accepted, first answer HTTP {status}", mid)
    return Tracked(index, now, f"refused: HTTP {status}: {_message(doc)}")


def run_success_test(client: Client, instance_id: str, chat_id: str, count: int = 5,
                     interval_ms: int = 2000, timeout_s: float = 120.0, *, out: TextIO,
                     sleep: Callable[[float], None] = time.sleep,
                     now: Callable[[], float] = time.monotonic) -> int:
    """Send ``count`` messages ``interval_ms`` apart, follow them to their final state,
    print a line per message and the real success rate. Exit 0 when every message was
    delivered, 1 otherwise, 3 when the daemon cannot be reached."""
    run = uuid.uuid4().hex[:8]
    print(f"test-success-rate {run}: {count} message(s) from {instance_id} to {chat_id} "
          f"through {client.target.url}, one every {interval_ms} ms", file=out, flush=True)
    tracked: list[Tracked] = []
    try:
        for i in range(1, count + 1):
            if i > 1:
                _pause(client, tracked, interval_ms / 1000, out, count, sleep, now)
            t = send_test_message(client, instance_id, chat_id,
                                  f"blast-supervisor test {i}/{count} ({run})", i, now())
            tracked.append(t)
            print(f"[{i}/{count}] sent      {_short(t.message_id):12}  {t.answer}",
                  file=out, flush=True)
            _poll(client, tracked, now(), out, count)
        _follow(client, tracked, timeout_s, out, count, sleep, now)
    except DaemonError as exc:
        print(f"test-success-rate: {exc}", file=out, flush=True)
        return EXIT_UNKNOWN
    result = summarize(tracked)
    for line in result_lines(result):
        print(line, file=out, flush=True)
    return 0 if result.delivered == result.count else 1


def _follow(client: Client, tracked: list[Tracked], timeout_s: float, out: TextIO, count: int,
            sleep: Callable[[float], None], now: Callable[[], float]) -> None:
    deadline = now() + timeout_s
    last_note = -float("inf")
    while any(t.open for t in tracked):
        t_now = now()
        if t_now >= deadline:
            left = sum(1 for t in tracked if t.open)
            print(f"gave up waiting after {timeout_s:g} s: {left} message(s) still queued "
                  f"(they stay in the journal and are still sent)", file=out, flush=True)
            return
        if t_now - last_note >= 5.0:
            last_note = t_now
            left = sum(1 for t in tracked if t.open)
            print(f"waiting for {left} message(s) to finish "
                  f"({deadline - t_now:.0f} s left)…", file=out, flush=True)
        sleep(POLL_S)
        _poll(client, tracked, now(), out, count)


def _pause(client: Client, tracked: list[Tracked], seconds: float, out: TextIO, count: int,
           sleep: Callable[[float], None], now: Callable[[], float]) -> None:
    """Wait between two sends, reporting the messages that finish meanwhile."""
    end = now() + seconds
    while (left := end - now()) > 0:
        sleep(min(POLL_S, left))
        _poll(client, tracked, now(), out, count)


def _took(view: Mapping[str, Any]) -> str:
    """How long the supervisor took from accepting the message to its final state (both
    times are the daemon's, so no clock skew)."""
    try:
        created = datetime.fromisoformat(str(view["created_at"]).replace("Z", "+00:00"))
        updated = datetime.fromisoformat(str(view["updated_at"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return ""
    return f", {(updated - created).total_seconds():.1f} s after it was accepted"


def _poll(client: Client, tracked: list[Tracked], t_now: float, out: TextIO,
          count: int) -> None:
    """Ask for every open message; print the ones that reached a final state."""
    for t in tracked:
        if not t.open:
            continue
        view = client.get(f"/supervisor/messages/{t.message_id}")
        t.attempts = int(view.get("attempts", 0))
        t.last_error = view.get("last_error")
        if view.get("state") not in FINAL_STATES:
            continue
        t.state, t.finished_at = str(view["state"]), t_now
        took = _took(view)
        tries = f"after {t.attempts} attempt{'s' if t.attempts != 1 else ''}"
        detail = f": {t.last_error}" if t.state != "delivered" and t.last_error else ""
        print(f"[{t.index}/{count}] {t.state:9} {_short(t.message_id):12}  {tries}{took}"
              f"{detail}", file=out, flush=True)


# --------------------------------------------------------------------------- queue


def run_queue_list(client: Client, instance_id: str | None, states: Sequence[str], limit: int,
                   as_json: bool, out: TextIO) -> int:
    """``queue list``: messages of the journal, newest first."""
    query: list[tuple[str, str]] = [("limit", str(limit))]
    if instance_id:
        query.append(("instance_id", instance_id))
    query += [("state", s) for s in states]
    try:
        doc = client.get("/supervisor/messages?" + urllib.parse.urlencode(query))
    except DaemonError as exc:
        print(f"queue list: {exc}", file=out)
        return EXIT_UNKNOWN
    if as_json:
        for m in doc["messages"]:
            print(json.dumps(m), file=out)
    else:
        for line in messages_lines(doc["messages"]):
            print(line, file=out)
    return 0


def run_queue_action(client: Client, action: str, message_ids: Sequence[str], out: TextIO
                     ) -> int:
    """``queue requeue|cancel ID…``: exit 0 when every message was changed, else 1."""
    failed = 0
    done = {"requeue": "requeued", "cancel": "cancelled"}.get(action, action)
    for mid in message_ids:
        try:
            status, _, doc = client.call(
                "POST", f"/supervisor/messages/{urllib.parse.quote(mid, safe='')}/{action}",
                admin=True)
        except DaemonError as exc:
            print(f"queue {action}: {exc}", file=out)
            return EXIT_UNKNOWN
        if 200 <= status < 300:
            state = doc.get("state") if isinstance(doc, dict) else None
            print(f"{mid}: {done}" + (f" (now {state})" if state else ""), file=out)
        else:
            failed += 1
            print(f"{mid}: not {done}: HTTP {status}: {_message(doc)}", file=out)
    return 0 if not failed else 1


def _admin_call(client: Client, method: str, path: str, what: str, out: TextIO
                ) -> tuple[int | None, Any]:
    """An admin call: ``(None, answer)``, or ``(exit code, None)`` after saying why not."""
    try:
        status, _, doc = client.call(method, path, admin=True)
    except DaemonError as exc:
        print(f"{what}: {exc}", file=out)
        return EXIT_UNKNOWN, None
    if not 200 <= status < 300:
        print(f"{what}: HTTP {status}: {_message(doc)}", file=out)
        return 1, None
    return None, doc


def run_requeue_dead(client: Client, instance_id: str | None, out: TextIO) -> int:
    """``queue requeue --dead [--instance ID]``: every dead message back to the queue."""
    path = "/supervisor/dead/requeue"
    if instance_id:
        path += "?" + urllib.parse.urlencode({"instance_id": instance_id})
    code, doc = _admin_call(client, "POST", path, "queue requeue", out)
    if code is not None:
        return code
    n = doc.get("requeued", 0) if isinstance(doc, dict) else 0
    where = f" of {instance_id}" if instance_id else ""
    print(f"requeued {n} dead message(s){where}", file=out)
    return 0


def run_webhooks(client: Client, action: str, state: str, webhook_id: str | None,
                 out: TextIO) -> int:
    """``webhooks list [--state S]`` and ``webhooks replay [WEBHOOK_ID]`` (admin token)."""
    if action == "list":
        method, path = "GET", "/supervisor/webhooks?" + urllib.parse.urlencode({"state": state})
    else:
        method, path = "POST", "/supervisor/webhooks/replay"
        if webhook_id:
            path += "?" + urllib.parse.urlencode({"webhook_id": webhook_id})
    code, doc = _admin_call(client, method, path, f"webhooks {action}", out)
    if code is not None:
        return code
    if action == "replay":
        print(f"{doc.get('replayed', 0)} failed webhook(s) to be delivered again", file=out)
        return 0
    for w in doc["webhooks"]:
        print(f"{w['webhook_id']}  {w['endpoint']:<12} {w['event']:<18} {w['subject']}  "
              f"attempts {w['attempts']}  {w['last_error'] or ''}".rstrip(), file=out)
    return 0


def tool_webhooks(args: argparse.Namespace, target: Target) -> int:
    """``webhooks list|replay``."""
    return run_webhooks(Client(target), args.action, args.state, args.webhook_id, sys.stdout)


# --------------------------------------------------------------------------- command line


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="the daemon's YAML configuration (for its address "
                                          "and admin token; default the system one if it "
                                          "exists)")
    p.add_argument("--url", help="the daemon's base URL, e.g. http://127.0.0.1:8001 (default: "
                                 "from the configuration; env BLAST_SUPERVISOR_URL)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for one answer of the daemon (default 10)")


def tool_status(args: argparse.Namespace, target: Target) -> int:
    """``status [INSTANCE]``."""
    return run_status(Client(target), args.instance, sys.stdout)


def tool_test_success_rate(args: argparse.Namespace, target: Target) -> int:
    """``test-success-rate INSTANCE_ID CHAT_ID [COUNT] [INTERVAL_MS]``."""
    if args.count < 1 or args.interval_ms < 0:
        print("test-success-rate: COUNT must be >= 1 and INTERVAL_MS >= 0", file=sys.stderr)
        return EXIT_CRITICAL
    return run_success_test(Client(target), args.instance_id, args.chat_id, args.count,
                            args.interval_ms, args.wait, out=sys.stdout)


def tool_queue(args: argparse.Namespace, target: Target) -> int:
    """``queue list|requeue|cancel``."""
    client = Client(target)
    if args.action == "list":
        return run_queue_list(client, args.instance, args.state or [], args.limit, args.json,
                              sys.stdout)
    if args.action == "requeue" and args.dead:
        if args.message_ids:
            print("queue requeue: give message ids or --dead, not both", file=sys.stderr)
            return EXIT_CRITICAL
        return run_requeue_dead(client, args.instance, sys.stdout)
    if not args.message_ids:
        print(f"queue {args.action}: name at least one message id"
              + (" (or --dead)" if args.action == "requeue" else ""), file=sys.stderr)
        return EXIT_CRITICAL
    return run_queue_action(client, args.action, args.message_ids, sys.stdout)


def add_subcommands(add: Callable[[str, str], argparse.ArgumentParser],
                    func: Callable[[argparse.Namespace], int]) -> None:
    """Register ``status``, ``test-success-rate``, ``queue`` and ``webhooks``; ``func``
    resolves the target (configuration, environment) and calls ``args.tool``."""
    p = add("status", "instances, queues, success rates and health from the running daemon "
                      "(exit 0 healthy, 1 warning, 2 critical, 3 unreachable)")
    _common(p)
    p.add_argument("instance", nargs="?", metavar="INSTANCE", help="only this instance (the "
                   "exit code is then its health)")
    p.set_defaults(func=func, tool=tool_status)

    p = add("test-success-rate", "send COUNT test messages through the proxy, follow each to "
                                 "its final state, print the real success rate")
    _common(p)
    p.add_argument("instance_id", metavar="INSTANCE_ID")
    p.add_argument("chat_id", metavar="CHAT_ID", help="e.g. 6281234567890@c.us (a number you "
                                                      "own: the messages are really sent)")
    p.add_argument("count", metavar="COUNT", nargs="?", type=int, default=5,
                   help="messages to send (default 5)")
    p.add_argument("interval_ms", metavar="INTERVAL_MS", nargs="?", type=int, default=2000,
                   help="pause between two sends (default 2000)")
    p.add_argument("--access-token", help="the instance's access token (env BLAST_ACCESS_TOKEN)")
    p.add_argument("--wait", type=float, default=120.0, metavar="S",
                   help="how long to follow the messages after the last send (default 120)")
    p.set_defaults(func=func, tool=tool_test_success_rate)

    p = add("queue", "list the journal's messages, requeue dead ones, cancel queued ones")
    _common(p)
    p.add_argument("action", choices=("list", "requeue", "cancel"))
    p.add_argument("message_ids", metavar="MESSAGE_ID", nargs="*")
    p.add_argument("--instance", help="only this instance (list, requeue --dead)")
    p.add_argument("--state", action="append", help="list: only this state (repeatable): "
                   "queued, sending, delivered, unknown, dead, cancelled")
    p.add_argument("--limit", type=int, default=50, help="list: at most this many (default 50)")
    p.add_argument("--json", action="store_true", help="list: one JSON object per line")
    p.add_argument("--dead", action="store_true", help="requeue: every dead message")
    p.add_argument("--admin-token", help="requeue/cancel: auth.admin_token "
                                         "(env BLAST_SUPERVISOR_ADMIN_TOKEN)")
    p.set_defaults(func=func, tool=tool_queue)

    p = add("webhooks", "list outcome webhooks (failed by default), or deliver failed ones "
                        "again")
    _common(p)
    p.add_argument("action", choices=("list", "replay"))
    p.add_argument("webhook_id", metavar="WEBHOOK_ID", nargs="?",
                   help="replay: only this one (default: every failed webhook)")
    p.add_argument("--state", default="failed", choices=("failed", "pending", "delivered"),
                   help="list: which ones (default failed)")
    p.add_argument("--admin-token", help="auth.admin_token (env BLAST_SUPERVISOR_ADMIN_TOKEN)")
    p.set_defaults(func=func, tool=tool_webhooks)
