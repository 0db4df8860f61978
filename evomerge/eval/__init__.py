"""The evaluator: tasks defined as data under `evomerge/tasks/`, batched greedy generation, scoring, result cache.

Typical use (a search builds the Evaluator once and calls `evaluate` per candidate):

    task = load_task("toy_ja_math", {"zoo_dir": zoo_dir})
    evaluator = Evaluator(task, "search", tokenizer, batch_size=64)
    result = evaluator.evaluate(model, model_key=recipe_hash)   # result.metrics["score"] is the fitness
"""

from evomerge.errors import TaskError
from evomerge.eval.evaluator import EvalResult, Evaluator, ResultCache
from evomerge.eval.generate import GenerationSettings, encode_prompts, generate_encoded, generate_greedy
from evomerge.eval.task import CompositeTask, Example, SplitData, Task, available_tasks, load_task

__all__ = [
    "CompositeTask",
    "EvalResult",
    "Evaluator",
    "Example",
    "GenerationSettings",
    "ResultCache",
    "SplitData",
    "Task",
    "TaskError",
    "available_tasks",
    "encode_prompts",
    "generate_greedy",
    "generate_encoded",
    "load_task",
]
