"""The evaluator: tasks defined as data under `tasks/`, batched greedy generation, scoring, result cache."""

from evomerge.eval.task import CompositeTask, Example, SplitData, Task, TaskError, available_tasks, load_task

__all__ = ["CompositeTask", "Example", "SplitData", "Task", "TaskError", "available_tasks", "load_task"]
