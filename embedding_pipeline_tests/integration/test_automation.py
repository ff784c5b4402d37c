"""Automation with the real Dagster daemon and webserver, over a real Triton and milvus-lite of this module's own.

* The drop sensor survives a daemon restart: a drop placed while the daemon is down is ingested once it is back,
  and the drop ingested before is not ingested again.
* A run canceled while its worker is dead and still holds the "triton" pool slot does not deadlock the pool: run
  monitoring frees the slot ``free_slots_after_run_end_seconds`` after the run ended, and the next runs get the
  slot — one at a time.

The instance is the packaged ``dagster_instance.yaml`` with shorter run-monitoring timings, so the test waits
seconds where a deployment waits a minute.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Iterator

import pytest
import requests
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.instance.ref import InstanceRef

from embedding_pipeline import services
from embedding_pipeline.orchestration import instance as orchestration_instance
from embedding_pipeline.orchestration import names
from embedding_pipeline.runtime import processes
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.drops import READY_MARKER
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests.images import altered_copies
from embedding_pipeline_tests.integration.conftest import running_stack, write_config

pytestmark = pytest.mark.integration

# Short run-monitoring timings for the test instance (the shipped ones are 30 s / 60 s).
FREE_SLOTS_AFTER_S, CANCEL_TIMEOUT_S, MONITOR_POLL_S = 3, 3, 1
FINISHED = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)


def short_monitoring_instance_yaml() -> str:
    config = yaml.safe_load(resources.files("embedding_pipeline").joinpath("dagster_instance.yaml").read_text())
    config["run_monitoring"].update(
        free_slots_after_run_end_seconds=FREE_SLOTS_AFTER_S,
        cancel_timeout_seconds=CANCEL_TIMEOUT_S,
        poll_interval_seconds=MONITOR_POLL_S,
    )
    return yaml.safe_dump(config)


@pytest.fixture(scope="module")
def dagster_stack(tmp_path_factory) -> Iterator[tuple[Settings, DagsterInstance]]:
    """Triton, milvus-lite, Dagster webserver and daemon for a home of this module's own; all stopped at the end."""
    home = tmp_path_factory.mktemp("automation_home")
    with running_stack(home, write_config(home)) as settings:
        try:
            # The storage created here, before the daemon and webserver start: three processes creating a fresh
            # SQLite instance at once can stamp its schema version twice.
            orchestration_instance.prepare_dagster_home(settings, short_monitoring_instance_yaml())
            instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(settings.paths.dagster_home)))
            services.start_dagster(settings, instance_yaml=short_monitoring_instance_yaml())
            yield settings, instance
        finally:
            services.stop_dagster(settings)


def stage_drop(settings: Settings, name: str, photo: str = "coffee") -> Path:
    """A folder drop of three photos with its marker, under a hidden name the sensor ignores."""
    staging = settings.drops / f".{name}.tmp"
    staging.mkdir(parents=True)
    for kind, data in altered_copies(load_photo(photo)).items():
        (staging / f"{photo}-{kind}.jpg").write_bytes(data)
    (staging / READY_MARKER).touch()
    return staging


def place_drop(settings: Settings, name: str, photo: str = "coffee") -> None:
    stage_drop(settings, name, photo).rename(settings.drops / name)


def runs_of(instance: DagsterInstance, drop: str) -> list[DagsterRun]:
    return instance.get_runs(filters=RunsFilter(tags={"drop": drop}))


def wait_for_status(instance: DagsterInstance, run_id: str, statuses, timeout: float = 240.0) -> DagsterRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in statuses:
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} not in {statuses} after {timeout:.0f} s (now {run.status if run else None})")


def wait_for_drop_run(instance: DagsterInstance, drop: str, timeout: float = 240.0) -> DagsterRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = runs_of(instance, drop)
        if runs and runs[0].status in FINISHED:
            assert runs[0].status == DagsterRunStatus.SUCCESS, (drop, runs[0].status)
            return runs[0]
        time.sleep(0.5)
    raise AssertionError(f"no finished run for drop {drop!r} after {timeout:.0f} s")


def test_sensor_neither_reingests_nor_skips_a_drop_across_a_daemon_restart(dagster_stack):
    settings, instance = dagster_stack
    place_drop(settings, "before-restart")
    wait_for_drop_run(instance, "before-restart")

    assert processes.stop(settings.paths.run, services.DAEMON)
    place_drop(settings, "while-down", photo="chelsea")
    time.sleep(3 * settings.dagster.sensor_interval_s + 1)
    assert runs_of(instance, "while-down") == []  # nobody is watching

    services.start_dagster(settings, instance_yaml=short_monitoring_instance_yaml())  # the daemon again, same instance
    restarted = time.time()
    wait_for_drop_run(instance, "while-down")
    # Let the sensor tick a few more times after both drops are known.
    sensor_ticks = lambda: [  # noqa: E731
        t for t in instance.get_ticks(*_sensor_ids(instance)) if t.timestamp > restarted
    ]
    deadline = time.monotonic() + 60
    while len(sensor_ticks()) < 4:
        assert time.monotonic() < deadline, "the sensor did not tick after the restart"
        time.sleep(0.5)

    for drop in ("before-restart", "while-down"):
        runs = runs_of(instance, drop)
        assert [(r.status, r.tags["trigger"]) for r in runs] == [(DagsterRunStatus.SUCCESS, "sensor")], drop
    assert set(instance.get_dynamic_partitions("drops")) >= {"before-restart", "while-down"}


def _sensor_ids(instance: DagsterInstance) -> tuple[str, str]:
    states = [s for s in instance.all_instigator_state() if s.name == "drop_sensor"]
    assert len(states) == 1, states
    return states[0].instigator_origin_id, states[0].selector_id


class InferenceGate:
    """A loopback HTTP proxy in front of Triton that holds every inference request while closed.

    Metadata and readiness calls pass, so a run gets through `preprocessed_batches` and stops inside
    `image_embeddings` — holding the "triton" pool slot — for as long as the test wants.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.open = threading.Event()
        self.inference_seen = threading.Event()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if "/infer" in self.path:
                    gate.inference_seen.set()
                    gate.open.wait()
                host, port = gate.upstream.rsplit(":", 1)
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "host")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                try:
                    self.send_response(answer.status)
                    for key, value in answer.getheaders():
                        if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client was the killed run worker
                    self.close_connection = True

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.open.set()
        self.server.shutdown()
        self.server.server_close()


def graphql(settings: Settings, query: str, variables: dict | None = None) -> dict:
    answer = requests.post(
        services.webserver_url(settings) + "/graphql", json={"query": query, "variables": variables or {}}, timeout=60
    )
    answer.raise_for_status()
    body = answer.json()
    assert "errors" not in body, body
    return body["data"]


LAUNCH = """
mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename
  ... on LaunchRunSuccess { run { runId } }
  ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } }
} }"""


def launch_ingest(settings: Settings, drop: str, triton_url: str) -> str:
    """What a user does in the launchpad: an ingest run for a drop, with the Triton resource pointed elsewhere."""
    params = {
        "selector": {
            "repositoryLocationName": names.LOCATION_NAME,
            "repositoryName": "__repository__",
            "jobName": "ingest_drop",
        },
        "runConfigData": {"resources": {"triton": {"config": {"url": triton_url}}}},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": drop}, {"key": "drop", "value": drop}]},
    }
    result = graphql(settings, LAUNCH, {"params": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def worker_pid(instance: DagsterInstance, run_id: str) -> int:
    """The process that executes the run's steps (the in-process executor reports it)."""
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        if event and event.message and event.message.startswith("Executing steps in process"):
            return int(event.engine_event_data.metadata["pid"].value)
    raise AssertionError(f"run {run_id} reported no step process")


# The step of a one-shard drop that holds the Triton pool's slot (the embed stage's shard step).
EMBED_STEP = "image_embeddings.embed_shard[shard_0000]"


def triton_slots(instance: DagsterInstance) -> list[tuple[str, str]]:
    info = instance.event_log_storage.get_concurrency_info("triton")
    return [(slot.run_id, slot.step_key) for slot in info.claimed_slots]


def step_intervals(instance: DagsterInstance, run_id: str, step: str) -> tuple[float, float]:
    times = {
        record.dagster_event_type: record.timestamp
        for record in instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS})
        if record.step_key == step
    }
    return times[DagsterEventType.STEP_START], times[DagsterEventType.STEP_SUCCESS]


def waiting_for_triton(instance: DagsterInstance) -> list[tuple[str, str]]:
    info = instance.event_log_storage.get_concurrency_info("triton")
    return [(step.run_id, step.step_key) for step in info.pending_steps if step.assigned_timestamp is None]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_dead_run_holding_the_triton_slot_is_canceled_and_frees_the_pool(dagster_stack):
    settings, instance = dagster_stack
    gate = InferenceGate(settings.triton.url)
    worker = None
    try:
        # Partitions first, so the sensor leaves these drops to the runs launched below.
        instance.add_dynamic_partitions("drops", ["held", "waiting"])
        place_drop(settings, "held", photo="astronaut")
        place_drop(settings, "waiting", photo="rocket")
        held = launch_ingest(settings, "held", gate.url)
        assert gate.inference_seen.wait(180), "the run never reached image_embeddings"
        assert triton_slots(instance) == [(held, EMBED_STEP)]

        # A second run, straight to Triton: it gets through preprocessing, then queues for the slot.
        waiting = launch_ingest(settings, "waiting", settings.triton.url)
        wait_until(
            lambda: waiting_for_triton(instance) == [(waiting, EMBED_STEP)],
            180,
            "the second run never queued for the triton slot",
        )
        assert triton_slots(instance) == [(held, EMBED_STEP)]

        # Cancel the first run in the instance (as "mark as canceled" does, without asking the worker to stop),
        # then kill its worker: a canceled run whose dead process still holds the slot and can never release it.
        # (Freezing the worker and terminating through the code server instead hangs the code server: it waits
        # for the worker to acknowledge the termination.)
        worker = worker_pid(instance, held)
        instance.report_run_canceled(instance.get_run_by_id(held), "canceled by the test; its worker is killed")
        os.kill(worker, signal.SIGKILL)
        worker = None
        ended = instance.get_run_record_by_id(held).end_time

        # Run monitoring frees the dead run's slot free_slots_after_run_end_seconds after it ended; the waiting
        # run takes it and succeeds.
        wait_until(
            lambda: not any(run == held for run, _ in triton_slots(instance)),
            FREE_SLOTS_AFTER_S + 30,
            f"triton slot still held: {triton_slots(instance)}",
        )
        run = wait_for_status(instance, waiting, FINISHED)
        assert run.status == DagsterRunStatus.SUCCESS
        assert instance.get_run_by_id(held).status == DagsterRunStatus.CANCELED
        got_slot_after = step_intervals(instance, waiting, EMBED_STEP)[0] - ended
        assert got_slot_after >= FREE_SLOTS_AFTER_S - 0.5, got_slot_after  # freed by run monitoring, not the run
        print(f"the waiting run got the triton slot {got_slot_after:.1f} s after the canceled run ended")
        assert triton_slots(instance) == [] and waiting_for_triton(instance) == []
    finally:
        if worker is not None:
            os.kill(worker, signal.SIGKILL)
        gate.close()
