"""The Dagster code location: assets, resources, sensor and jobs, wired from the one settings model."""

from dagster import Definitions

from embedding_pipeline.defs.assets import ingest_assets
from embedding_pipeline.defs.checks import quality_checks
from embedding_pipeline.defs.duplicates import duplicate_assets, duplicate_checks, duplicate_jobs
from embedding_pipeline.defs.export import export_jobs
from embedding_pipeline.defs.jobs import ingest_drop_job, ingest_drop_sharded_job, search_images
from embedding_pipeline.defs.models import model_assets, observe_embedding_model, switch_search_collection
from embedding_pipeline.defs.resources import MilvusResource, TritonResource
from embedding_pipeline.defs.retention import retention_jobs
from embedding_pipeline.defs.schedules import rescan_drops
from embedding_pipeline.defs.sensors import drop_sensor

defs = Definitions(
    assets=[*ingest_assets, *model_assets, *duplicate_assets],
    asset_checks=[*quality_checks, *duplicate_checks],
    jobs=[
        ingest_drop_job,
        ingest_drop_sharded_job,
        search_images,
        *retention_jobs,
        observe_embedding_model,
        switch_search_collection,
        *duplicate_jobs,
        *export_jobs,
    ],
    sensors=[drop_sensor],
    schedules=[rescan_drops],
    resources={
        # Empty resources: every value comes from the settings of the process that runs the step.
        "triton": TritonResource(),
        "milvus": MilvusResource(),
    },
)
