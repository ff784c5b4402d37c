from dagster import DynamicPartitionsDefinition

from embedding_pipeline.orchestration.names import DROPS_PARTITION

# One partition per drop (a folder or manifest file in the drop directory), never one per image.
drops_partitions = DynamicPartitionsDefinition(name=DROPS_PARTITION)
