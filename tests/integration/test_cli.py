"""CLI behaviour that operators rely on."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest

from gpufleet.registry import inventory
from tests.harness import FleetHarness


def test_a_trigger_that_dies_makes_the_process_exit_non_zero(harness: FleetHarness) -> None:
    # Kafka unreachable: the trigger cannot start, and the process must say so (exit 1) so it gets restarted.
    harness.write_config(kafka={"bootstrap_servers": "127.0.0.1:1", "request_timeout_ms": 1000,
                                "session_timeout_ms": 1000, "heartbeat_interval_ms": 300})  # fmt: skip
    cmd = [sys.executable, "-m", "gpufleet", "trigger", "--config", str(harness.config)]
    result = subprocess.run(cmd, capture_output=True, env=harness.env(), timeout=120)
    assert result.returncode == 1
    assert b"trigger failed" in result.stderr
    # One line that says what to check, not a traceback.
    assert b"cannot reach Kafka at 127.0.0.1:1" in result.stderr
    assert b"GPUFLEET_KAFKA__BOOTSTRAP_SERVERS" in result.stderr
    assert b"Traceback" not in result.stderr


def test_check_lists_functions_and_triggers_and_rejects_bad_config(harness: FleetHarness) -> None:
    cmd = [sys.executable, "-m", "gpufleet", "check", "--config", str(harness.config)]
    out = subprocess.run(cmd, capture_output=True, env=harness.env(), check=True).stdout.decode()
    assert "function echo:" in out and "trigger requests:" in out and "disabled" not in out
    off = {"source": f"kafka:///{harness.topic('off')}", "enabled": False}
    harness.write_config(triggers={"requests": {"source": f"kafka:///{harness.topic('requests')}"}, "off": off})
    lines = subprocess.run(cmd, capture_output=True, env=harness.env(), check=True).stdout.decode().splitlines()
    [on_line] = [line for line in lines if line.startswith("trigger requests:")]
    [off_line] = [line for line in lines if line.startswith("trigger off:")]
    assert "disabled" not in on_line and off_line.endswith("[disabled: enabled: false, not run]")
    harness.write_config(worker={"virtual_gpu": 1})
    bad = subprocess.run(cmd, capture_output=True, env=harness.env())
    assert bad.returncode == 2
    assert b"worker.virtual_gpu: unknown key (fix: did you mean 'virtual_gpus'?)" in bad.stderr


def test_killing_run_with_sigkill_leaves_no_process_behind(harness: FleetHarness) -> None:
    harness.start()
    harness.send("echo", {"x": 1}, id="before-kill")
    harness.wait_for(lambda: harness.runs("requests:before-kill") == 1, what="the fleet to run a task")
    assert harness.proc is not None
    tree = psutil.Process(harness.proc.pid).children(recursive=True)
    assert len(tree) >= 5  # dispatcher, trigger, supervisor, and a Celery worker per virtual GPU
    os.kill(harness.proc.pid, signal.SIGKILL)
    harness.proc.wait()
    harness.proc = None
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, [p.cmdline() for p in alive]


def test_a_dispatcher_without_redis_says_what_to_check_and_keeps_trying(harness: FleetHarness) -> None:
    harness.write_config(redis={"url": "redis://127.0.0.1:1/0"})
    cmd = [sys.executable, "-m", "gpufleet", "dispatcher", "--config", str(harness.config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=harness.env())
    assert proc.stderr is not None
    first, deadline = b"", time.monotonic() + 60  # its first attempt, whenever a loaded machine lets it get there
    while b"failed; retrying" not in first and proc.poll() is None and time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 1.0)[0]:
            first += os.read(proc.stderr.fileno(), 65536)  # unbuffered: select() sees only what the pipe holds
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"no exit 30 s after SIGTERM:\n{(first + err).decode()[-3000:]}") from None
    err = first + err
    assert b"Traceback" not in err
    waits = [line for line in err.decode().splitlines() if "failed; retrying" in line]
    assert waits and all("is Redis running at redis://127.0.0.1:1/0?" in line for line in waits), err[-2000:]


@pytest.mark.parametrize("command", ["api", "run"])
def test_a_taken_api_port_fails_before_anything_starts_with_exit_5(harness: FleetHarness, command: str) -> None:
    """A second `gpufleet run` (or `api`) on this machine: one line naming the port and the fix, exit 5, and no
    role joins the fleet meanwhile."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        harness.write_config(api={"enabled": True, "host": "127.0.0.1", "port": port,
                                  "token": "Z5JiSDMvqzdouHu8q4SPqltrFOEYiYzSNdeIHFGVoNM"})  # fmt: skip
        cmd = [sys.executable, "-m", "gpufleet", command, "--config", str(harness.config)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=harness.env(), timeout=60)
    assert result.returncode == 5, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line == (f"gpufleet: error: api.port {port} on 127.0.0.1 is in use (is gpufleet already running here?); "
                    "stop what holds it, or set api.port (GPUFLEET_API__PORT)")  # fmt: skip
    assert inventory.gpus(harness.registry) == []  # no worker registered


def test_init_writes_a_project_that_runs_from_its_folder_to_a_first_record(harness: FleetHarness) -> None:
    """`gpufleet init DIR`, then `gpufleet run` in DIR with no --config (only the servers' addresses from the
    environment, as `gpufleet dev up` exports them): a message on the starter trigger's topic gets its record."""
    h = harness
    project = h.dir / "myfleet"
    done = subprocess.run([sys.executable, "-m", "gpufleet", "init", str(project)], capture_output=True, text=True,
                          env=h.env(), timeout=60)  # fmt: skip
    assert done.returncode == 0 and "gpufleet run" in done.stdout, done.stderr
    again = subprocess.run([sys.executable, "-m", "gpufleet", "init", str(project)], capture_output=True, text=True,
                           env=h.env(), timeout=60)  # fmt: skip
    assert again.returncode == 2 and "already there" in again.stderr and "nothing was written" in again.stderr
    trigger = project / "triggers" / "requests.yaml"
    assert "source: kafka:///requests" in trigger.read_text()
    trigger.write_text(trigger.read_text().replace("kafka:///requests", f"kafka:///{h.topic('requests')}"))

    (h.dir / "elsewhere").mkdir()
    outside = subprocess.run([sys.executable, "-m", "gpufleet", "run"], capture_output=True, text=True,
                             env=h.env(), cwd=h.dir / "elsewhere", timeout=60)  # fmt: skip
    assert outside.returncode == 2 and "no fleet here" in outside.stderr and "`gpufleet init`" in outside.stderr

    env = {**h.env(), "GPUFLEET_REDIS__URL": h.services.redis_url, "GPUFLEET_REDIS__KEY_PREFIX": h.prefix,
           "GPUFLEET_KAFKA__BOOTSTRAP_SERVERS": h.services.kafka_bootstrap,
           "GPUFLEET_DEFAULTS__ON_SUCCESS": f"kafka:///{h.topic('success')}"}  # fmt: skip
    log = open(h.dir / "fleet.log", "ab")  # noqa: SIM115 - the child writes to it
    h.proc = subprocess.Popen([sys.executable, "-m", "gpufleet", "run"], cwd=project, env=env, stdout=log,
                              stderr=log, process_group=0)  # fmt: skip
    log.close()
    h.produce("requests", [b'{"name": "Ada"}'])
    [record] = h.records("success", at_least=1, timeout_s=120)
    assert record["value"]["responsePayload"]["greeting"] == "hello, Ada", h.log_text()[-3000:]
    assert record["value"]["responsePayload"]["prefix"] == "warm"


@pytest.mark.serial  # a bound in time: alone, on an unloaded machine
def test_ctrl_c_of_an_idle_fleet_returns_within_2_s_though_sqs_is_in_a_long_poll(harness: FleetHarness,
                                                                                  moto: Any) -> None:  # fmt: skip
    """Every role of `gpufleet run`, an SQS trigger in its 20 s long poll: Ctrl-C (SIGINT) stops all in 2 s (it took
    15-19 s, waiting the poll out)."""
    from tests.contracts.test_trigger_contract import WANTED
    from tests.s3util import sqs_client

    h = harness
    queue = f"q-{h.prefix}"
    sqs_client(moto.url).create_queue(QueueName=queue)
    s3 = {"endpoint_url": moto.url, "sqs_endpoint_url": moto.url, "access_key_id": moto.access_key,
          "secret_access_key": moto.secret_key}  # fmt: skip
    h.write_config(triggers={"bucket": {"source": f"sqs:///{queue}", "wait_time_s": 20, **WANTED}}, s3=s3)
    h.start()
    h.wait_for(lambda: '"event":"ready"' in h.log_text(), 90, "the ready line")
    h.wait_for(lambda: '"sqs trigger receiving"' in h.log_text(), 30, "the trigger's first poll")
    time.sleep(1)  # well inside the 20 s poll
    assert h.proc is not None
    started = time.monotonic()
    os.kill(h.proc.pid, signal.SIGINT)
    h.proc.wait(timeout=60)
    took = time.monotonic() - started
    assert took <= 2.0, f"Ctrl-C took {took:.1f} s\n{h.log_text()[-3000:]}"
