"""Pretraining modes for main_pretrain_cook.py, registered by name; one file per mode (see modes/base.py).

A new mode is one module in this package defining a `modes.base.PretrainMode` subclass decorated with
`@register_mode`; modules are discovered when the registry is first asked. Registering a mode also
declares its path through the backbone to models.trainable (what trains in it).
"""
from models.trainable import register_mode_path
from util.registry import Registry

_REGISTRY = Registry("mode", __name__, __path__)
_MODES = _REGISTRY.entries


def register_mode(cls):
    """Class decorator: make a PretrainMode subclass available as `--mode cls.name`."""
    _REGISTRY.add(cls.name, cls)
    register_mode_path(cls.name, cls.towers, cls.heads)
    return cls


def mode_names():
    return _REGISTRY.names()


def all_modes():
    return _REGISTRY.all()


def get_mode(name):
    """The PretrainMode class registered as `name` (KeyError naming the known modes otherwise)."""
    return _REGISTRY.get(name)
