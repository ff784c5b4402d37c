"""The production topology on one machine, end to end: drops in a bucket in, searchable rows out.

* the Dagster instance is deploy/dagster.yaml as it is (PostgreSQL storage, the QueuedRunCoordinator), on a real
  PostgreSQL;
* the code location runs as its own gRPC code server; the daemon and the webserver load it through a workspace file
  that names that server, and runs are launched by it;
* drops arrive in a SeaweedFS bucket and every stage writes its outputs to the same bucket, nothing to the state
  directory;
* the rows go to a Milvus 2.3.5 standalone server with authorization; the embeddings come from the session's Triton.

Settings reach every process through the environment (a YAML file plus the standard variables). The drop sensor
ingests a drop once it has its ``_READY`` marker; a drop that lands while the daemon is down is ingested, exactly
once, after the daemon comes back, and the earlier drop is not ingested again.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import requests
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.instance.ref import InstanceRef

from embedding_pipeline.orchestration.names import DROP_TAG, LOCATION_NAME
from embedding_pipeline.retrieval import ImageSearcher
from embedding_pipeline.runtime import processes
from embedding_pipeline.runtime.state import HOME_ENV
from embedding_pipeline.settings import CONFIG_ENV, load_settings
from embedding_pipeline.sources.drops import READY_MARKER
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests.integration.conftest import REPO_ROOT
from embedding_pipeline_tests.integration.postgres_server import postgres  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

FIRST, SECOND = "topology-first", "topology-second"
FIRST_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")
SECOND_PHOTOS = ("camera", "china")
RUN_TIMEOUT_S = 240.0
START_TIMEOUT_S = 120.0
CODE_SERVER, DAEMON, WEBSERVER = "code-server", "dagster-daemon", "dagster-webserver"
FINISHED = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _jpeg(name: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(load_photo(name)).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Topology:
    """The three Dagster processes of one deployment, their logs, and the instance they share."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env
        self.run_dir, self.log_dir = root / "run", root / "logs"
        self.code_port, self.web_port = processes.free_ports(2)
        self.workspace = root / "workspace.yaml"
        self.workspace.write_text(
            "load_from:\n  - grpc_server:\n      host: 127.0.0.1\n"
            f"      port: {self.code_port}\n      location_name: {LOCATION_NAME}\n"
        )
        self.url = f"http://127.0.0.1:{self.web_port}"

    def _start(self, name: str, argv: list[str]) -> processes.Managed:
        return processes.start(self.run_dir, self.log_dir, name, argv, env=self.env, cwd=self.root)

    def start_code_server(self) -> None:
        argv = [_tool("dagster"), "code-server", "start", "-m", "embedding_pipeline.defs"]
        argv += ["-h", "127.0.0.1", "-p", str(self.code_port), "--location-name", LOCATION_NAME]
        proc = self._start(CODE_SERVER, argv)
        processes.wait_until(
            lambda: processes.port_open("127.0.0.1", self.code_port), START_TIMEOUT_S, "code server", proc
        )

    def start_daemon(self) -> processes.Managed:
        return self._start(DAEMON, [_tool("dagster-daemon"), "run", "-w", str(self.workspace)])

    def start_webserver(self) -> None:
        argv = [_tool("dagster-webserver"), "-w", str(self.workspace), "-h", "127.0.0.1", "-p", str(self.web_port)]
        proc = self._start(WEBSERVER, argv)
        processes.wait_until(
            lambda: processes.http_ok(f"{self.url}/server_info"), START_TIMEOUT_S, "Dagster webserver", proc
        )

    def kill_daemon(self) -> None:
        """SIGKILL, as a crashed or evicted daemon: no clean shutdown."""
        proc = processes.read(self.run_dir, DAEMON)
        assert proc is not None, "the daemon is not running"
        os.killpg(proc.pid, signal.SIGKILL)
        processes.wait_until(lambda: not proc.alive(), 30, "daemon to die")
        processes.stop(self.run_dir, DAEMON)  # reaps it and removes the pid file

    def stop_all(self) -> None:
        for name in (DAEMON, WEBSERVER, CODE_SERVER):
            processes.stop(self.run_dir, name, timeout=15)

    def graphql(self, query: str) -> dict:
        answer = requests.post(f"{self.url}/graphql", json={"query": query}, timeout=30)
        answer.raise_for_status()
        body = answer.json()
        assert "errors" not in body, body
        return body["data"]

    def logs(self) -> str:
        return "\n".join(processes.log_tail(self.log_dir / f"{n}.log", 40) for n in (DAEMON, CODE_SERVER, WEBSERVER))


def _wait_for_location(topology: Topology) -> None:
    """Until the webserver has loaded the code location from the code server; fails at once on a load error."""
    query = (
        "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
        "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        try:
            entries = topology.graphql(query)["workspaceOrError"]["locationEntries"]
        except (requests.RequestException, AssertionError, KeyError, TypeError) as exc:
            last = repr(exc)
        else:
            last = entries
            entry = next((e for e in entries if e["name"] == LOCATION_NAME), None)
            loaded = entry and entry["loadStatus"] == "LOADED" and entry["locationOrLoadError"]
            if loaded and loaded["__typename"] == "PythonError":
                raise AssertionError(f"the code location failed to load: {loaded['message']}\n{topology.logs()}")
            if loaded and loaded["__typename"] == "RepositoryLocation":
                return
        time.sleep(0.5)
    raise AssertionError(f"the webserver did not load {LOCATION_NAME!r} (last answer: {last})\n{topology.logs()}")


def _run_errors(instance: DagsterInstance, run_id: str) -> str:
    """The failures a run recorded: step and run failures, and engine events carrying an error."""
    lines = []
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None:
            continue
        error = getattr(event.event_specific_data, "error", None)
        if event.event_type in (DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE) or error is not None:
            text = error.to_string() if error is not None else (event.message or "")
            lines.append(f"[{event.event_type_value} {event.step_key or ''}] {text}")
    return "\n".join(lines) or "(no error events)"


def _runs_of(instance: DagsterInstance, drop: str) -> list:
    return instance.get_runs(filters=RunsFilter(tags={DROP_TAG: drop}))


def _wait_for_success(instance: DagsterInstance, topology: Topology, drop: str) -> str:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = _runs_of(instance, drop)
        finished = [r for r in runs if r.status in FINISHED]
        if finished:
            run = finished[0]
            if run.status != DagsterRunStatus.SUCCESS:
                raise AssertionError(
                    f"the run of drop {drop!r} ended {run.status.value}:\n{_run_errors(instance, run.run_id)}\n"
                    f"{topology.logs()}"
                )
            return run.run_id
        time.sleep(1)
    seen = [(r.run_id, r.status.value) for r in _runs_of(instance, drop)]
    errors = "\n".join(_run_errors(instance, run_id) for run_id, _ in seen)
    raise AssertionError(
        f"no successful run of drop {drop!r} after {RUN_TIMEOUT_S:.0f} s (runs: {seen})\n{errors}\n{topology.logs()}"
    )


def _put_drop(seaweedfs, bucket: str, drop: str, photos: tuple[str, ...], manifest: bool) -> dict[str, bytes]:
    """The photos as JPEG objects under drops/<drop>/ (and a manifest naming their ids), then the marker."""
    images = {name: _jpeg(name) for name in photos}
    for name, data in images.items():
        seaweedfs.put(bucket, f"drops/{drop}/{name}.jpg", data)
    if manifest:
        rows = [{"id": f"{drop}-{name}", "uri": f"{name}.jpg", "metadata": {"photo": name}} for name in photos]
        seaweedfs.put(bucket, f"drops/{drop}/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    seaweedfs.put(bucket, f"drops/{drop}/{READY_MARKER}", b"")
    return images


def _keys(seaweedfs, bucket: str, prefix: str) -> set[str]:
    pages = seaweedfs.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_sensor_ingests_bucket_drops_through_code_server_into_milvus_server(
    stack,
    postgres,  # noqa: F811 - the fixture imported above
    seaweedfs,
    standalone_milvus,
    tmp_path,
    monkeypatch,
):
    started = time.monotonic()
    bucket = seaweedfs.make_bucket("topology")
    home = tmp_path / "home"
    home.mkdir()
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO_ROOT / "deploy" / "dagster.yaml", dagster_home / "dagster.yaml")
    milvus = standalone_milvus.server
    config = tmp_path / "embedding_pipeline.yaml"
    config.write_text(
        f"milvus:\n  collection: topology_{secrets.token_hex(4)}\n"
        # Only the marker completes a drop: a drop is never taken half-written.
        "dagster:\n  sensor_interval_s: 1\n  drop_settle_s: 3600\n  step_retries: 1\n  step_retry_delay_s: 1\n"
    )
    env = {
        **os.environ,
        HOME_ENV: str(home),
        CONFIG_ENV: str(config),
        "EMBEDDING_PIPELINE_DROPS": f"s3://{bucket}/drops",
        "EMBEDDING_PIPELINE_OUTPUTS": f"s3://{bucket}/outputs",
        "TRITON_URL": stack.triton.url,
        "MILVUS_URI": milvus.uri,
        "MILVUS_USER": "root",
        "MILVUS_PASSWORD": milvus.password,
        "DAGSTER_HOME": str(dagster_home),
        **postgres.dagster_env(),
        **seaweedfs.env(),
        # Nothing from a developer's own AWS files.
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "MILVUS_TOKEN"):
        env.pop(name, None)
    settings = load_settings(config, environ=env)
    assert str(settings.drops_location) == f"s3://{bucket}/drops" and settings.milvus.uri == milvus.uri

    # This process reads the same instance (and creates its tables before the servers start, so they do not race).
    for key, value in postgres.dagster_env().items():
        monkeypatch.setenv(key, value)
    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home)))
    topology = Topology(tmp_path, env)
    try:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        topology.start_code_server()
        topology.start_daemon()
        topology.start_webserver()
        _wait_for_location(topology)
        up = time.monotonic()

        # 1-2. A drop in the bucket, marker last: the sensor's run ingests it.
        first = _put_drop(seaweedfs, bucket, FIRST, FIRST_PHOTOS, manifest=True)
        first_run = _wait_for_success(instance, topology, FIRST)
        ingested = time.monotonic()
        run = instance.get_run_by_id(first_run)
        assert run.tags.get("trigger") == "sensor" and run.tags.get("dagster/partition") == FIRST, run.tags
        # Queued by the sensor, started by the daemon through the code server the workspace names.
        assert instance.all_logs(first_run, of_type=DagsterEventType.RUN_ENQUEUED)
        origin = run.remote_job_origin.repository_origin.code_location_origin
        assert (type(origin).__name__, origin.host, origin.port) == (
            "GrpcServerCodeLocationOrigin",
            "127.0.0.1",
            topology.code_port,
        )
        # The webserver (another process, same storage) reports the run.
        data = topology.graphql(
            '{ runsOrError(filter: {tags: [{key: "drop", value: "%s"}]}) '
            "{ ... on Runs { results { runId status } } } }" % FIRST
        )
        assert data["runsOrError"]["results"] == [{"runId": first_run, "status": "SUCCESS"}]

        # 3. The rows are in the Milvus server: each image finds itself first.
        with ImageSearcher(settings) as searcher:
            for name in ("chelsea", "rocket"):
                hits = searcher.search(first[name], top_k=3)
                assert hits and hits[0].id == f"{FIRST}-{name}", [(h.id, h.score) for h in hits]
            assert searcher.index.count_drop(FIRST) == len(FIRST_PHOTOS)

        # 4. The stage outputs are in the bucket; the state directory holds no drops or outputs.
        outputs = _keys(seaweedfs, bucket, "outputs/")
        for key in (
            f"outputs/manifests/{FIRST}.arrow",
            f"outputs/preprocessed/{FIRST}/_COMMIT.json",
            f"outputs/embeddings/{FIRST}/_COMMIT.json",
        ):
            assert key in outputs, sorted(outputs)
        for local in (home / "drops", home / "data"):
            assert not local.exists() or not any(local.rglob("*")), sorted(local.rglob("*"))

        # 5. A drop that lands while the daemon is down is ingested once it is back, exactly once; the first drop
        # is not ingested again.
        topology.kill_daemon()
        second = _put_drop(seaweedfs, bucket, SECOND, SECOND_PHOTOS, manifest=False)
        time.sleep(2)
        assert _runs_of(instance, SECOND) == [], "a run started while the daemon was down"
        topology.start_daemon()
        second_run = _wait_for_success(instance, topology, SECOND)
        # A few more sensor ticks with both drops present, then count.
        time.sleep(5)
        assert [r.run_id for r in _runs_of(instance, SECOND)] == [second_run]
        assert [r.run_id for r in _runs_of(instance, FIRST)] == [first_run]
        assert len(instance.get_runs()) == 2
        assert set(instance.get_dynamic_partitions("drops")) == {FIRST, SECOND}
        with ImageSearcher(settings) as searcher:
            assert searcher.index.count_drop(SECOND) == len(SECOND_PHOTOS)
            hits = searcher.search(second["camera"], top_k=1)
            assert hits and hits[0]["drop"] == SECOND, [(h.id, h.score) for h in hits]
        assert f"outputs/embeddings/{SECOND}/_COMMIT.json" in _keys(seaweedfs, bucket, "outputs/")
        done = time.monotonic()
        print(
            f"topology up {up - started:.1f} s, first drop {ingested - up:.1f} s, "
            f"restart and second drop {done - ingested:.1f} s, total {done - started:.1f} s"
        )
    finally:
        topology.stop_all()
        instance.dispose()
