"""lm-evaluation-harness integration: the ``lssa-hf`` model type, the offline long-context task folder
and the score-vs-length report. Importing ``lssa_hf.harness.model`` registers the model type."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"  # pass to --include_path / TaskManager


def task_manager(include_path=None, **kwargs):
    """A harness TaskManager that also indexes our tasks (and ``include_path``, if given)."""
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else include_path if isinstance(include_path, (list, tuple)) else [include_path]
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], **kwargs)
