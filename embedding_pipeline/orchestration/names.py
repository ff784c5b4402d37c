"""The names the pipeline and Dagster share: partitions, run tags, jobs and the code location.

Plain strings, no imports: the definitions (``defs/``), the code that drives Dagster (this package) and the
surfaces all spell them from here, so a run launched by the sensor, the schedule, the CLI or the API carries the
same tags and lands in the same partitions.
"""

# One partition per drop (a folder or manifest file in the drop directory), never one per image.
DROPS_PARTITION = "drops"

# Run tag naming the drop a run works on. The sensor, schedule, CLI, API and retention set it; Dagster itself
# tags partitioned runs (backfills included) with PARTITION_TAG only.
DROP_TAG = "drop"
PARTITION_TAG = "dagster/partition"
# Either tag names a drop: a run is "on" a drop when one of them says so.
DROP_TAGS = (DROP_TAG, PARTITION_TAG)
# Who launched a run: "sensor", "schedule", "api".
TRIGGER_TAG = "trigger"
# Runs of a re-embed backfill.
REEMBED_TAG = "reembed"

INGEST_JOB = "ingest_drop"
# The same assets with one process per step: a big drop's shards run in parallel (the drop sensor and the CLI's
# ingest pick it for drops of more than `dagster.shard_items` items; the rescan schedule targets INGEST_JOB).
INGEST_SHARDED_JOB = "ingest_drop_sharded"
# The assets of INGEST_JOB, partitioned by drop, in the order a drop passes them.
INGEST_ASSETS = ("raw_image_manifest", "preprocessed_batches", "image_embeddings", "milvus_collection")
# The on-demand near-duplicate groups of a drop, downstream of the ingest assets.
DUPLICATES_ASSET = "near_duplicates"
# Every asset partitioned by drop: what deleting a drop wipes the history of.
DROP_ASSETS = (*INGEST_ASSETS, DUPLICATES_ASSET)
DELETE_DROP_JOB = "delete_drop"
SWITCH_JOB = "switch_search_collection"
OBSERVE_MODEL_JOB = "observe_embedding_model"
EXPORT_JOB = "export_embeddings"

# The code location as the workspace file names it, and the repository Dagster makes of a Definitions object.
LOCATION_NAME = "embedding_pipeline"
REPOSITORY_NAME = "__repository__"
DEFS_MODULE = "embedding_pipeline.defs"

# Run statuses after which a run changes no more.
FINISHED_STATUSES = frozenset({"SUCCESS", "FAILURE", "CANCELED"})
