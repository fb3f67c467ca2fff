"""Frozen weights off a mode's path, kept off the training device.

A mode's step never touches the other modality's experts and embeddings, the VL experts or the other heads
(image_mim on vlmo_base: the text experts, the 30k-token embeddings and MLM head, the VL experts; 2.2x the
step's own parameters). `park_off_path` detaches every submodule whose parameters are all frozen and off the
mode's path from the model (so DDP, built afterwards, never sees them: its parameters must share one device
type) and keeps them on the CPU; `attached()` puts them back for the moments that need the whole model (the
checkpoint's state dict), then detaches them again.
"""
import contextlib

from models.trainable import on_mode_path, tower_of


class ParkedModules:
    def __init__(self, model, entries, names=()):
        self.model, self.entries = model, entries  # [(parent module, attribute name, module)]
        self.names = list(names)  # their dotted names in the model

    def describe(self, device, mode):
        return (f"kept off {device}: {self.num_parameters() / 1e6:.2f}M frozen parameters off the {mode} path "
                f"({self.nbytes() / 2 ** 20:.0f} MiB; {len(self.names)} modules)")

    def num_parameters(self):
        return sum(p.numel() for _, _, m in self.entries for p in m.parameters())

    def nbytes(self):
        return sum(p.numel() * p.element_size() for _, _, m in self.entries for p in m.parameters())

    def _detach(self):
        for parent, name, _ in self.entries:
            setattr(parent, name, None)

    @contextlib.contextmanager
    def attached(self):
        """The whole model (parked modules back in place, still on the CPU) inside the block."""
        for parent, name, module in self.entries:
            setattr(parent, name, module)
        try:
            yield self.model
        finally:
            self._detach()


def park_off_path(model, mode, keep_towers=(), device="cpu"):
    """Detach and move to `device` the largest submodules of `model` whose parameters are all frozen, off
    `mode`'s path and outside `keep_towers` (towers, "image"/"text", the mode's evaluation also runs, e.g.
    text_distill's zero-shot); returns ParkedModules (empty for models that name their own towers, e.g. the
    dual encoder)."""
    if hasattr(model, "configure_trainable"):
        return ParkedModules(model, [])

    def parkable(name, p):
        return not p.requires_grad and not on_mode_path(name, mode) and tower_of(name) not in keep_towers
    entries, taken = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(t + ".") for t in taken):
            continue
        params = list(module.named_parameters())
        if params and all(parkable(f"{name}.{n}", p) for n, p in params):
            parent_name, _, attr = name.rpartition(".")
            entries.append((model.get_submodule(parent_name) if parent_name else model, attr, module))
            taken.append(name)
    parked = ParkedModules(model, entries, taken)
    for _, _, module in entries:
        module.to(device)
    parked._detach()
    return parked
