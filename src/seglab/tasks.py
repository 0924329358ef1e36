"""Which module serves each task. The engine asks this table; it never imports a task itself.

A task module defines a subclass of :class:`seglab.engine.trainer.Task`: how to build its data
and model, one training step, validation, what its checkpoints ship, and its predictor. A new
task is a module and a line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from seglab.errors import SeglabError
from seglab.registry import did_you_mean

if TYPE_CHECKING:
    from seglab.engine.trainer import Task

TASKS = {
    "semantic": "seglab.semantic.task:SemanticTask",
    "instance": "seglab.instance.task:InstanceTask",
    "detect": "seglab.instance.task:InstanceTask",
    "generate": "seglab.gen.task:GenTask",
}


def get_task(name: str, flag: str = "--task") -> type[Task]:
    """The Task class of ``name``, imported on first use (so ``seglab --help`` loads no detector)."""
    if name not in TASKS:
        raise SeglabError(f"{flag} {name!r}{did_you_mean(name, list(TASKS))}: choose one of {', '.join(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
