"""The production instance (deploy/dagster.yaml) on a real PostgreSQL: one ingest run recorded in it.

The run executes against the session's real Triton and Milvus; its record is read back through a fresh instance
object and straight from PostgreSQL's ``runs`` table.
"""

import json
import shutil
from pathlib import Path

import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.instance.ref import InstanceRef

from embedding_pipeline import retention
from embedding_pipeline.orchestration import runs
from embedding_pipeline.orchestration.instance import DagsterDrops
from embedding_pipeline.orchestration.names import INGEST_ASSETS
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests.integration.conftest import REPO_ROOT
from embedding_pipeline_tests.integration.postgres_server import postgres  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

DROP = "postgres-recorded"


@pytest.fixture
def postgres_home(postgres, tmp_path, monkeypatch):  # noqa: F811 - the fixture imported above
    """A Dagster home holding deploy/dagster.yaml as it is, its PostgreSQL settings in the environment."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    for key, value in postgres.dagster_env().items():
        monkeypatch.setenv(key, value)
    # runs.ingest and the job use the instance DAGSTER_HOME names (the session's SQLite one otherwise).
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def _drop(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    rows = []
    for name in ("chelsea", "rocket"):
        Image.fromarray(load_photo(name)).save(folder / f"{name}.jpg", quality=90)
        rows.append({"id": f"{DROP}-{name}", "uri": f"{name}.jpg"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_an_ingest_run_is_recorded_in_postgres(stack, postgres, postgres_home, tmp_path):  # noqa: F811
    instance = DagsterInstance.get()
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"

        summary = runs.ingest(stack, _drop(tmp_path / DROP), DROP)
        assert summary["success"] and summary["ok"] == 2, summary

        # A fresh instance object, loaded from the home like the webserver or daemon would.
        fresh = DagsterInstance.from_ref(InstanceRef.from_dir(str(postgres_home)))
        try:
            recorded = fresh.get_runs(filters=RunsFilter(tags={"drop": DROP}))
            assert [(r.run_id, r.job_name, r.status) for r in recorded] == [
                (summary["run_id"], "ingest_drop", DagsterRunStatus.SUCCESS)
            ]
            assert DROP in fresh.get_dynamic_partitions("drops")
            materialized = fresh.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey("milvus_collection"), asset_partitions=[DROP]), limit=1
            ).records
            assert materialized and materialized[0].run_id == summary["run_id"]
        finally:
            fresh.dispose()

        # And straight from PostgreSQL.
        connection = postgres.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pipeline_name, status, partition FROM runs WHERE run_id = %s", (summary["run_id"],)
                )
                assert cursor.fetchall() == [("ingest_drop", "SUCCESS", DROP)]
                cursor.execute(
                    "SELECT asset_key FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
                    (summary["run_id"], "ASSET_MATERIALIZATION"),
                )
                materialized_keys = {AssetKey.from_db_string(row[0]) for row in cursor.fetchall()}
                assert {AssetKey(name) for name in INGEST_ASSETS} <= materialized_keys
        finally:
            connection.close()
    finally:
        # The session's Milvus collection and drop folder are shared with other tests: leave them as they were.
        try:
            retention.delete_drop(stack, DROP, DagsterDrops(instance))
        except retention.UnknownDropError:
            pass
        instance.dispose()
