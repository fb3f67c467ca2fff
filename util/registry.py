"""A name -> class registry whose entries are the modules of one package, imported when first asked:
the pretraining modes (modes/) and the downstream tasks (tasks/) each register one class per file."""
import importlib
import pkgutil


class Registry:
    def __init__(self, kind, package, path, not_members=("base",)):
        self.kind, self.package, self.path, self.not_members = kind, package, path, set(not_members)
        self.entries = {}

    def add(self, name, cls):
        if name in self.entries and self.entries[name] is not cls:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({self.entries[name].__module__}, "
                             f"{cls.__module__})")
        self.entries[name] = cls
        return cls

    def _discover(self):
        for info in pkgutil.iter_modules(self.path):
            if info.name not in self.not_members:
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self):
        self._discover()
        return sorted(self.entries)

    def all(self):
        return [self.entries[n] for n in self.names()]

    def get(self, name):
        """The class registered as `name` (KeyError naming the known ones otherwise)."""
        self._discover()
        if name not in self.entries:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self.entries))}")
        return self.entries[name]
