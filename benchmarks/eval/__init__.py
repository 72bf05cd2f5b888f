"""Selection-quality evaluation: benchmark tasks, a fixed-vocabulary Kneser-Ney trigram yardstick, external DSIR."""

from benchmarks.eval.metrics import BUDGET_TOLERANCE, ProtocolError, check_protocol, evaluate_selection
from benchmarks.eval.ngram_lm import KneserNeyTrigramLM, Vocab
from benchmarks.eval.tasks import TASKS, Task, TaskSpec, build_tasks, load_task, task_vocab

__all__ = [
    "BUDGET_TOLERANCE", "KneserNeyTrigramLM", "ProtocolError", "TASKS", "Task", "TaskSpec", "Vocab",
    "build_tasks", "check_protocol", "evaluate_selection", "load_task", "task_vocab",
]
