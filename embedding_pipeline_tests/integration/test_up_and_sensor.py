"""`embedding-pipeline up` as a user runs it: real Triton, Milvus, Dagster webserver and daemon in a fresh home.

The daemon's sensor ingests the sample drop, then a newly dropped folder; `down` leaves no process behind.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.instance.ref import InstanceRef

from embedding_pipeline import services
from embedding_pipeline.runtime import processes
from embedding_pipeline.settings import load_settings
from embedding_pipeline.sources.drops import READY_MARKER
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests.images import altered_copies
from embedding_pipeline_tests.integration.conftest import stack_env, write_config

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("embedding-pipeline"))


def wait_for_run(instance: DagsterInstance, drop: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs(filters=RunsFilter(tags={"drop": drop}))
        if runs and runs[0].status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE):
            return runs[0]
        time.sleep(1)
    raise AssertionError(f"no finished run for drop {drop!r} after {timeout:.0f} s")


def test_up_ingests_sample_and_new_drops_then_down_stops_everything(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, **stack_env(home, write_config(home, settle_s=2.0))}
    env.pop("DAGSTER_HOME")  # `up` must find its instance by itself
    up_log = open(tmp_path / "up.log", "w")
    up = subprocess.Popen([CLI, "up"], env=env, stdout=up_log, stderr=subprocess.STDOUT, cwd=tmp_path)
    settings = load_settings(home / "embedding_pipeline.yaml", environ=env)
    try:

        def ui_ready() -> bool:
            if up.poll() is not None:
                raise AssertionError(f"`up` exited early:\n{(tmp_path / 'up.log').read_text()}")
            return processes.http_ok(services.webserver_url(settings) + "/server_info")

        deadline = time.monotonic() + 300
        while not ui_ready():
            assert time.monotonic() < deadline, "Dagster UI not ready after 300 s"
            time.sleep(0.5)
        instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(settings.paths.dagster_home)))
        run = wait_for_run(instance, "sample-photos")
        assert run.status == DagsterRunStatus.SUCCESS
        # What the UI shows: the webserver's GraphQL API reports the materialized partition.
        query = (
            '{ assetOrError(assetKey: {path: ["milvus_collection"]}) '
            "{ ... on Asset { assetMaterializations(limit: 5) { partition runId } } } }"
        )
        answer = requests.post(services.webserver_url(settings) + "/graphql", json={"query": query}, timeout=30)
        materializations = answer.json()["data"]["assetOrError"]["assetMaterializations"]
        assert {"partition": "sample-photos", "runId": run.run_id} in materializations

        # A folder copied in under a temporary name and renamed, with no marker: complete once settled.
        staging = settings.drops / ".new-drop.tmp"
        staging.mkdir()
        for kind, data in altered_copies(load_photo("coffee")).items():
            (staging / f"coffee-{kind}.jpg").write_bytes(data)
        staging.rename(settings.drops / "new-drop")
        run = wait_for_run(instance, "new-drop")
        assert run.status == DagsterRunStatus.SUCCESS
        assert set(instance.get_dynamic_partitions("drops")) == {"sample-photos", "new-drop"}
        assert not (settings.drops / "new-drop" / READY_MARKER).exists()

        pids = [processes.read(settings.paths.run, n).pid for n in services.MANAGED]
        down = subprocess.run([CLI, "down"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=60) == 0
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        # Nothing started from this home survives: no process has it on its command line or in its environment.
        leftovers = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True).stdout.split()
        assert not leftovers, leftovers
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(timeout=60)
        services.stop_all(settings)
        up_log.close()
