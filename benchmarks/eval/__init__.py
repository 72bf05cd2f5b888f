"""Selection-quality evaluation: benchmark tasks, a fixed-vocabulary Kneser-Ney trigram yardstick, external DSIR,
and a tiny-transformer second opinion (transformer_lm; torch is imported only when a model is built)."""

from benchmarks.eval.metrics import BUDGET_TOLERANCE, ProtocolError, check_protocol, evaluate_selection
from benchmarks.eval.ngram_lm import KneserNeyTrigramLM, Vocab
from benchmarks.eval.tasks import TASKS, Task, TaskSpec, build_tasks, load_task, task_vocab
from benchmarks.eval.transformer_lm import TransformerLM, TransformerLMConfig, evaluate_transformer, plan_transformer

__all__ = [
    "BUDGET_TOLERANCE", "KneserNeyTrigramLM", "ProtocolError", "TASKS", "Task", "TaskSpec", "TransformerLM",
    "TransformerLMConfig", "Vocab", "build_tasks", "check_protocol", "evaluate_selection", "evaluate_transformer",
    "load_task", "plan_transformer", "task_vocab",
]
