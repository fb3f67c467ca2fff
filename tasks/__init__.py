"""Downstream tasks for main_finetune.py, registered by name; one file per task (see tasks/base.py).

A new task is one module in this package defining a `tasks.base.Task` subclass decorated with
`@register_task("name")`; modules are discovered when the registry is first asked.
"""
from util.registry import Registry

_REGISTRY = Registry("task", __name__, __path__)
_TASKS = _REGISTRY.entries


def register_task(name):
    """Class decorator: make a Task subclass available as `--task name`."""
    def wrap(cls):
        cls.name = name
        return _REGISTRY.add(name, cls)
    return wrap


def task_names():
    return _REGISTRY.names()


def all_tasks():
    return _REGISTRY.all()


def get_task(name):
    """The Task class registered as `name` (KeyError naming the known tasks otherwise)."""
    return _REGISTRY.get(name)
