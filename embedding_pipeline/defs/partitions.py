from dagster import DynamicPartitionsDefinition

# One partition per drop (a folder or manifest file in the drop directory), never one per image.
drops_partitions = DynamicPartitionsDefinition(name="drops")
