"""The command-line tools against a running daemon (status, test-success-rate, queue), and their
pure formatting."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from support.monitoring import ADMIN, CHAT, INSTANCE2, Stack, start_stack
from support.stack import INSTANCE, REPO, TOKEN, Child, free_port, wait_until

from supervisor.ctl import (
    RunResult,
    Tracked,
    base_url,
    result_lines,
    status_lines,
    summarize,
    table,
)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    """Run ``python -m supervisor ARGS`` (no system configuration is read: -c is not given
    and /etc/blast-supervisor does not exist here, or --url is given)."""
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One simulator and one daemon for the module; each test uses its own instance or only
    its own messages."""
    procs: list[Child] = []
    try:
        yield start_stack(procs, tmp_path_factory.mktemp("tools"))
    finally:
        for c in procs:
            c.stop(signal.SIGKILL)


def test_success_rate_counts_a_dead_message(stack: Stack) -> None:
    """Three HTTP 500s kill the first of 5 messages (max_retries 3): the tool reports 4/5
    delivered, 4/5 on the first attempt, 1 dead, and exits 1."""
    stack.fail(INSTANCE, 3)
    res = cli("test-success-rate", INSTANCE, CHAT, "5", "50", "--url", stack.base,
              "--access-token", TOKEN, "--wait", "30")
    out = res.stdout
    assert res.returncode == 1, out + res.stderr
    assert "result: 4/5 delivered (80.0 %), 4/5 on the first attempt (80.0 %), 1 dead, " \
           "0 still queued, 0 refused" in out
    assert "success rate: 80.0 %" in out
    sent = re.findall(r"^\[(\d)/5\] sent ", out, flags=re.MULTILINE)
    assert sent == ["1", "2", "3", "4", "5"]
    finals = dict(re.findall(r"^\[(\d)/5\] (delivered|dead)", out, flags=re.MULTILINE))
    assert finals == {"1": "dead", "2": "delivered", "3": "delivered", "4": "delivered",
                      "5": "delivered"}
    assert re.search(r"^\[1/5\] dead .* after 3 attempts.*HTTP 500", out, flags=re.MULTILINE)


def test_success_rate_counts_retried_deliveries(stack: Stack) -> None:
    """Two HTTP 500s delay the first message: all 5 delivered, 4 on the first attempt, exit 0;
    the token comes from the environment."""
    stack.fail(INSTANCE, 2)
    res = cli("test-success-rate", INSTANCE, CHAT, "5", "20", "--url", stack.base,
              "--wait", "30", env={"BLAST_ACCESS_TOKEN": TOKEN})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "result: 5/5 delivered (100.0 %), 4/5 on the first attempt (80.0 %), 0 dead, " \
           "0 still queued, 0 refused" in res.stdout
    assert re.search(r"^\[1/5\] delivered .* after 3 attempts", res.stdout, flags=re.MULTILINE)


def test_success_rate_reports_refused_sends(stack: Stack) -> None:
    """A wrong access token: every send refused (403), nothing delivered, exit 1."""
    res = cli("test-success-rate", INSTANCE, CHAT, "2", "0", "--url", stack.base,
              "--access-token", "0000000000000")
    assert res.returncode == 1
    assert "refused: HTTP 403" in res.stdout
    assert "result: 0/2 delivered (0.0 %), 0/2 on the first attempt (0.0 %), 0 dead, " \
           "0 still queued, 2 refused" in res.stdout


def test_status_exit_code_follows_health(stack: Stack) -> None:
    """`status ID` exits 0 healthy, 1 warning (80 %), 2 critical (logged out), 3 unknown."""
    res = cli("status", INSTANCE2, "--url", stack.base)
    assert res.returncode == 0, res.stdout
    assert re.search(rf"^{INSTANCE2}\s+ready\b.*\bhealthy\b", res.stdout, flags=re.MULTILINE)
    stack.fail(INSTANCE2, 3)
    ids = [stack.send_ok(f"status {n}", INSTANCE2) for n in range(5)]
    assert sorted(stack.wait_final(ids)) == ["dead"] + ["delivered"] * 4
    res = cli("status", INSTANCE2, "--url", stack.base)
    assert res.returncode == 1, res.stdout
    assert re.search(rf"^{INSTANCE2}\s.*\bwarning\s+0\s+0\s+0\s+1\s+80\.0 %", res.stdout,
                     flags=re.MULTILINE), res.stdout
    assert "dead message(s) wait for a decision" in res.stdout
    stack.drop(INSTANCE2, 401)
    wait_until(lambda: stack.instance(INSTANCE2)["session"]["state"] == "logged_out", 10,
               "the logout seen")
    res = cli("status", INSTANCE2, "--url", stack.base)
    assert res.returncode == 2, res.stdout
    assert "scan the QR code again in Waziper" in res.stdout
    res = cli("status", "ZZZZZZZZZZZZZ", "--url", stack.base)
    assert res.returncode == 3
    assert "instance ZZZZZZZZZZZZZ is not known" in res.stdout
    overall = cli("status", "--url", stack.base)
    assert overall.returncode == 2  # the worst instance decides
    assert INSTANCE in overall.stdout and INSTANCE2 in overall.stdout


def test_status_of_an_unreachable_daemon() -> None:
    """Nobody listening: exit 3 and a message saying what to check."""
    res = cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert res.returncode == 3
    assert "cannot reach blast-supervisor" in res.stdout and "is it running?" in res.stdout


def test_queue_list_requeue_cancel(stack: Stack) -> None:
    """`queue list --state dead` shows a dead message, `queue requeue ID` sends it again,
    `queue cancel` refuses a delivered one, and admin calls need the token."""
    stack.fail(INSTANCE, 3)
    mid = stack.send_ok("queue tool")
    assert stack.wait_final([mid]) == ["dead"]
    res = cli("queue", "list", "--state", "dead", "--instance", INSTANCE, "--url", stack.base)
    assert res.returncode == 0
    assert re.search(rf"^{mid}\s+{INSTANCE}\s+dead\s+3\s", res.stdout, flags=re.MULTILINE)
    res = cli("queue", "requeue", mid, "--url", stack.base)
    assert res.returncode == 3 and "no admin token" in res.stdout
    res = cli("queue", "requeue", mid, "--url", stack.base, "--admin-token", "wrong")
    assert res.returncode == 1 and "not requeued: HTTP 401" in res.stdout
    res = cli("queue", "requeue", mid, "--url", stack.base,
              env={"BLAST_SUPERVISOR_ADMIN_TOKEN": ADMIN})
    assert res.returncode == 0, res.stdout
    assert f"{mid}: requeued" in res.stdout
    assert stack.wait_final([mid]) == ["delivered"]
    res = cli("queue", "cancel", mid, "--url", stack.base, "--admin-token", ADMIN)
    assert res.returncode == 1 and "not cancelled: HTTP 409" in res.stdout
    stack.fail(INSTANCE, 3)
    other = stack.send_ok("queue tool 2")
    assert stack.wait_final([other]) == ["dead"]
    res = cli("queue", "requeue", "--dead", "--instance", INSTANCE, "--url", stack.base,
              "--admin-token", ADMIN)
    assert res.returncode == 0, res.stdout
    assert re.search(rf"requeued [1-9]\d* dead message\(s\) of {INSTANCE}", res.stdout)
    assert stack.wait_final([other]) == ["delivered"]
    res = cli("queue", "list", "--json", "--limit", "1", "--url", stack.base)
    assert res.returncode == 0 and res.stdout.count("\n") == 1


def test_config_gives_the_address_and_admin_token(stack: Stack) -> None:
    """With -c, the tools find the daemon at listen.host:port and use auth.admin_token."""
    res = cli("queue", "requeue", "--dead", "-c", str(stack.config))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("requeued ")


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(("host", "port", "url"), [
    ("127.0.0.1", 8001, "http://127.0.0.1:8001"),
    ("0.0.0.0", 8001, "http://127.0.0.1:8001"),
    ("::1", 9000, "http://[::1]:9000"),
    ("::", 9000, "http://127.0.0.1:9000"),
])
def test_base_url(host: str, port: int, url: str) -> None:
    """A wildcard listen address is reached on loopback; IPv6 literals get brackets."""
    assert base_url(host, port) == url


@pytest.mark.parametrize(("tracked", "expected"), [
    ([], RunResult(0, 0, 0, 0, 0, 0)),
    ([Tracked(1, 0, "delivered at once", "a", "delivered", 1),
      Tracked(2, 0, "queued", "b", "delivered", 2),
      Tracked(3, 0, "queued", "c", "dead", 3),
      Tracked(4, 0, "queued", "d", None, 1),
      Tracked(5, 0, "refused: HTTP 403")],
     RunResult(5, 2, 1, 1, 1, 1)),
])
def test_summarize(tracked: list[Tracked], expected: RunResult) -> None:
    """Delivered, first attempt (exactly one real send), dead, still queued and refused."""
    assert summarize(tracked) == expected


def test_result_lines() -> None:
    """The closing lines state every figure and the success rate."""
    assert result_lines(RunResult(5, 4, 3, 1, 0, 0)) == [
        "result: 4/5 delivered (80.0 %), 3/5 on the first attempt (60.0 %), 1 dead, "
        "0 still queued, 0 refused",
        "success rate: 80.0 %"]


def test_table_aligns_columns() -> None:
    """Left-aligned text, right-aligned numbers, no trailing blanks."""
    assert table(["A", "NUM"], [["xyz", "1"], ["q", "100"]], right=frozenset({1})) == [
        "A    NUM", "xyz    1", "q    100"]


def test_status_lines_of_a_view() -> None:
    """The status report: an overall line, a table row per instance, the recommendations."""
    stats = {"window_s": 3600.0, "window": {}, "total": {"success_rate": 75.0},
             "queued": 2, "dead_waiting": 1}
    view = {
        "overall": {"health": "warning", "ready": 1, "instances": 1, "queued": 2, "dead": 1,
                    "success_rate": 80.0, "first_attempt_rate": 60.0, "stats": stats},
        "instances": [{
            "instance_id": INSTANCE, "health": "warning", "success_rate": 80.0,
            "first_attempt_rate": 60.0, "stats": stats,
            "session": {"state": "ready", "code": None, "since_s": 30.0,
                        "conflicts_window": 2},
            "queue": {"queued": 2, "retrying": 1, "in_flight": 0, "dead": 1},
            "recommendations": [{"severity": "warning", "instance_id": INSTANCE,
                                 "text": "1 dead message(s) wait for a decision"}],
        }],
        "problems": {},
    }
    lines = status_lines(view, "http://127.0.0.1:8001")
    assert lines[0] == ("blast-supervisor at http://127.0.0.1:8001: warning — 1/1 instances "
                        "ready, 2 queued, 1 dead, success 80.0 % over 60 min (first attempt "
                        "60.0 %, since start 75.0 %)")
    assert lines[2].split() == ["INSTANCE", "SESSION", "HEALTH", "QUEUED", "RETRY", "SENDING",
                                "DEAD", "SUCCESS", "60", "min", "FIRST", "TRY", "SINCE",
                                "START", "440s"]
    assert lines[3].split() == [INSTANCE, "ready", "30", "s", "warning", "2", "1", "0", "1",
                                "80.0", "%", "60.0", "%", "75.0", "%", "2"]
    assert lines[-2:] == ["recommendations:",
                          f"  [warning] {INSTANCE}: 1 dead message(s) wait for a decision"]
