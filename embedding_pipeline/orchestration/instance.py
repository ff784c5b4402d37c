"""The pipeline's Dagster instance: where it lives, and what it knows about drops (partitions, runs, history).

Nothing here loads the definitions, so the definitions themselves (an op reading its own instance) may use it as
well as the surfaces. Launching jobs is :mod:`embedding_pipeline.orchestration.runs`.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

from embedding_pipeline.orchestration.names import (
    DEFS_MODULE,
    DROP_ASSETS,
    DROP_TAGS,
    DROPS_PARTITION,
    LOCATION_NAME,
)
from embedding_pipeline.runtime.state import private_state_dir
from embedding_pipeline.settings import Settings

# Statuses of a run that is about to read or write a drop's files, or is doing so.
BUSY_STATUSES = [
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


def prepare_dagster_home(settings: Settings, instance_yaml: str | None = None) -> Path:
    """Write the instance config (the packaged one unless ``instance_yaml`` is given) and a workspace file into the
    Dagster home; returns the workspace file."""
    home = settings.paths.dagster_home
    private_state_dir(settings.paths.root)
    home.mkdir(parents=True, exist_ok=True)
    instance = instance_yaml or resources.files("embedding_pipeline").joinpath("dagster_instance.yaml").read_text()
    (home / "dagster.yaml").write_text(instance)
    workspace = home / "workspace.yaml"
    workspace.write_text(
        f"load_from:\n  - python_module:\n      module_name: {DEFS_MODULE}\n      location_name: {LOCATION_NAME}\n"
    )
    return workspace


def use_dagster_home(settings: Settings) -> None:
    """Point this process at the pipeline's Dagster instance unless DAGSTER_HOME is set already."""
    if not os.environ.get("DAGSTER_HOME"):
        prepare_dagster_home(settings)
        os.environ["DAGSTER_HOME"] = str(settings.paths.dagster_home)


def pipeline_instance(settings: Settings) -> DagsterInstance:
    """The pipeline's Dagster instance (``DAGSTER_HOME``, or the one under the state directory)."""
    use_dagster_home(settings)
    return DagsterInstance.get()


def create_instance_storage(settings: Settings) -> None:
    """Create (or migrate) the instance's storage once, before the daemon and webserver start: two processes
    creating a fresh SQLite instance at the same moment can both record the schema version."""
    with DagsterInstance.from_config(str(settings.paths.dagster_home)):
        pass


def runs_in_progress(instance: DagsterInstance, drop: str, this_run: str | None = None) -> list[str]:
    """Ids of the runs queued or in progress on ``drop`` (by either drop tag), ``this_run`` left out."""
    run_ids: set[str] = set()
    for tag in DROP_TAGS:
        for run in instance.get_runs(filters=RunsFilter(tags={tag: drop}, statuses=BUSY_STATUSES)):
            run_ids.add(run.run_id)
    run_ids.discard(this_run or "")
    return sorted(run_ids)


class DagsterDrops:
    """Drops as the Dagster instance knows them: partitions, runs in progress and materialization history.

    It is what retention needs of Dagster (:class:`embedding_pipeline.retention.DropRegistry`), so retention itself
    stays free of Dagster.
    """

    def __init__(self, instance: DagsterInstance):
        self.instance = instance

    def names(self) -> list[str]:
        return list(self.instance.get_dynamic_partitions(DROPS_PARTITION))

    def is_partition(self, drop: str) -> bool:
        return self.instance.has_dynamic_partition(DROPS_PARTITION, drop)

    def add_partition(self, drop: str) -> None:
        self.instance.add_dynamic_partitions(DROPS_PARTITION, [drop])

    def delete_partition(self, drop: str) -> None:
        self.instance.delete_dynamic_partition(DROPS_PARTITION, drop)

    def runs_in_progress(self, drop: str, this_run: str | None = None) -> list[str]:
        return runs_in_progress(self.instance, drop, this_run)

    def wipe_history(self, drop: str) -> str:
        """Wipe the drop's materializations where the event storage can; says what happened."""
        try:
            for key in DROP_ASSETS:
                self.instance.wipe_asset_partitions(AssetKey(key), [drop])
        except NotImplementedError:
            # The open-source SQL event storages (SQLite, PostgreSQL) do not implement per-partition wipes; the
            # runs and their events stay as an audit trail, and with the partition gone the UI no longer lists
            # the drop.
            return "kept (this event storage cannot wipe single partitions; runs stay as the audit trail)"
        return "wiped"


_WRAPPERS = ("DagsterExecutionStepExecutionError", "RetryRequested")


def step_errors(events: Iterable[Any]) -> list[dict[str, str]]:
    """The failed steps of a run with their error messages (what a user needs to see first when a run fails)."""
    errors = []
    for event in events:
        if event.is_step_failure and event.step_failure_data is not None:
            error = event.step_failure_data.error
            retried = error is not None and (error.message or "").startswith("Exceeded max_retries")
            # A step that raised from inside a Dagster wrapper, or ran out of retries, carries the real exception
            # as its cause.
            while (
                error is not None
                and error.cause is not None
                and (
                    any(name in (error.cls_name or "") for name in _WRAPPERS)
                    or (error.message or "").startswith("Exceeded max_retries")
                )
            ):
                error = error.cause
            message = error.message.strip() if error is not None else "unknown error"
            errors.append(
                {"step": event.step_key or "", "error": message + (" (retries exhausted)" if retried else "")}
            )
    return errors


def run_step_errors(instance: DagsterInstance, run_id: str) -> list[dict[str, str]]:
    """:func:`step_errors` of a run recorded in ``instance``."""
    return step_errors([e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event is not None])
