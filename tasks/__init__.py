"""Downstream tasks for main_finetune.py, registered by name; one file per task (see tasks/base.py).

A new task is one module in this package defining a `tasks.base.Task` subclass decorated with
`@register_task("name")`; modules are discovered when the registry is first asked.
"""
import importlib
import pkgutil

_TASKS = {}
_NOT_TASKS = {"base"}


def register_task(name):
    """Class decorator: make a Task subclass available as `--task name`."""
    def wrap(cls):
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is registered twice ({_TASKS[name].__module__}, {cls.__module__})")
        cls.name = name
        _TASKS[name] = cls
        return cls
    return wrap


def _discover():
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_TASKS:
            importlib.import_module(f"{__name__}.{info.name}")


def task_names():
    _discover()
    return sorted(_TASKS)


def all_tasks():
    _discover()
    return [_TASKS[n] for n in sorted(_TASKS)]


def get_task(name):
    """The Task class registered as `name` (KeyError naming the known tasks otherwise)."""
    _discover()
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]
