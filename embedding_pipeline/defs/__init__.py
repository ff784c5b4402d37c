"""The Dagster code location: assets, resources, sensor and jobs, wired from the one settings model."""

from dagster import Definitions

from embedding_pipeline.defs.assets import ingest_assets
from embedding_pipeline.defs.jobs import ingest_drop_job, search_images
from embedding_pipeline.defs.resources import MilvusResource, TritonResource
from embedding_pipeline.defs.sensors import drop_sensor
from embedding_pipeline.settings import load_settings

_settings = load_settings()

defs = Definitions(
    assets=ingest_assets,
    jobs=[ingest_drop_job, search_images],
    sensors=[drop_sensor],
    resources={
        "triton": TritonResource.from_settings(_settings.triton),
        "milvus": MilvusResource.from_settings(_settings.milvus),
    },
)
