"""cotune.data: tasks (loading, splits, metrics), tokenising and federated partitioners."""

from cotune.data.encode import EncodedDataset, PadCollator, encode, make_loader
from cotune.data.partition import partition
from cotune.data.registry import canonical_name, list_tasks, load_task, task_names
from cotune.data.task import Example, Task

__all__ = [
    "EncodedDataset",
    "Example",
    "PadCollator",
    "Task",
    "canonical_name",
    "encode",
    "list_tasks",
    "load_task",
    "make_loader",
    "partition",
    "task_names",
]
