"""The op-based search job, run the way the README says: `dagster job execute -m embedding_pipeline ...`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance

pytestmark = pytest.mark.integration


def test_dagster_job_execute_reports_the_expected_top_hit(stack, ingested_photos, tmp_path):
    query = tmp_path / "query.yaml"
    image = stack.drops / "photos" / "chelsea.jpg"
    query.write_text(yaml.safe_dump({"ops": {"embed_query": {"config": {"image": str(image), "top_k": 3}}}}))
    dagster = Path(sys.executable).with_name("dagster")
    result = subprocess.run(
        [str(dagster), "job", "execute", "-m", "embedding_pipeline", "-j", "search_images", "-c", str(query)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "hit 1: id=chelsea score=1.0" in result.stdout + result.stderr

    # The hits are recorded as run metadata in the instance (a markdown table the UI renders).
    instance = DagsterInstance.get()
    run = instance.get_runs(limit=1)[0]
    assert run.job_name == "search_images"
    outputs = [
        e for e in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_OUTPUT) if e.step_key == "report_results"
    ]
    metadata = outputs[0].dagster_event.event_specific_data.metadata
    assert metadata["top_hit"].value == "chelsea"
    assert "| 1 | chelsea |" in metadata["hits"].value
