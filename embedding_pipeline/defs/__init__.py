"""The Dagster code location: assets, resources, sensor and jobs, wired from the one settings model."""

from dagster import Definitions

from embedding_pipeline.defs.assets import ingest_assets
from embedding_pipeline.defs.jobs import ingest_drop_job, search_images
from embedding_pipeline.defs.resources import MilvusResource, TritonResource
from embedding_pipeline.defs.sensors import drop_sensor

defs = Definitions(
    assets=ingest_assets,
    jobs=[ingest_drop_job, search_images],
    sensors=[drop_sensor],
    resources={
        # Empty resources: every value comes from the settings of the process that runs the step.
        "triton": TritonResource(),
        "milvus": MilvusResource(),
    },
)
