"""The DALL-E dVAE encoder, used as a frozen image tokenizer for BEiT-style masked image modelling.

The architecture is the published one (4 groups of residual blocks, widths n_hid * 1/2/4/8, a 7x7
input conv, a 1x1 output conv to the vocabulary, 2x2 max-pool after every group but the last), with
every size an argument, and with parameter names identical to the original ``dall_e`` package
(``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``, ``blocks.output.conv.w``, ...), so
its weights load one-to-one.

Loading:
- ``encoder.pkl`` (the original release: the whole ``dall_e.encoder.Encoder`` object pickled with
  ``torch.save``) is read through an allowlisting unpickler: only the classes such a file names are
  resolved, each module class to an inert stand-in, so neither the ``dall_e`` package nor
  unrestricted unpickling is needed.
- ``.safetensors`` (written once by ``util/convert_dvae.py``) holds the same tensors, with the
  architecture sizes as JSON in the file's metadata.

Input convention: the tokenizer takes images in [0, 1] and applies ``map_pixels`` itself; data
pipelines hand it plain [0, 1] images and never apply ``map_pixels`` anywhere else.
"""

from __future__ import annotations

import json
import os
import pickle
import types
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.errors import UserError

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Squeeze [0, 1] pixels into [eps, 1 - eps], the range the dVAE was trained on (eps = 0.1)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class DVAEConv2d(nn.Module):
    """Conv with 'same' padding whose parameters are named ``w`` [out, in, k, k] and ``b`` [out]."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.padding = (kernel_size - 1) // 2
        self.w = nn.Parameter(torch.empty(n_out, n_in, kernel_size, kernel_size))
        self.b = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w, std=(n_in * kernel_size**2) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=self.padding)


class DVAEEncoderBlock(nn.Module):
    """Residual block: 1x1 id path (Identity when widths match) + post_gain * (relu-conv3x3 x3, relu-conv1x1)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"n_out must be a multiple of 4, got {n_out}")
        n_hid = n_out // 4
        # Residual branches are scaled by 1/L^2 (L = total blocks) so the deep stack starts near identity.
        self.post_gain = 1.0 / (n_layers**2)
        self.id_path = DVAEConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()),
            ("conv_1", DVAEConv2d(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()),
            ("conv_2", DVAEConv2d(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()),
            ("conv_3", DVAEConv2d(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()),
            ("conv_4", DVAEConv2d(n_hid, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DVAEEncoder(nn.Module):
    """DALL-E dVAE encoder: [B, C, H, W] pixels (after ``map_pixels``) -> logits [B, vocab, H/s, W/s].

    s = 2 ** (group_count - 1): 8 for the published model, so 112 px -> 14 x 14 tokens.
    Published sizes (the defaults): n_hid 256, 2 blocks per group, 4 groups, vocabulary 8192.
    """

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, group_count: int = 4,
                 input_channels: int = 3, vocab_size: int = 8192):
        super().__init__()
        self.config = {"n_hid": n_hid, "n_blk_per_group": n_blk_per_group, "group_count": group_count,
                       "input_channels": input_channels, "vocab_size": vocab_size}
        n_layers = group_count * n_blk_per_group
        layers: list[tuple[str, nn.Module]] = [("input", DVAEConv2d(input_channels, n_hid, 7))]
        width = n_hid
        for g in range(group_count):
            out_width = n_hid * 2**g
            group: list[tuple[str, nn.Module]] = []
            for i in range(n_blk_per_group):
                group.append((f"block_{i + 1}", DVAEEncoderBlock(width, out_width, n_layers)))
                width = out_width
            if g < group_count - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", DVAEConv2d(width, vocab_size, 1)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def downsample(self) -> int:
        return 2 ** (self.config["group_count"] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def dvae_config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """Architecture sizes read off the tensor names and shapes (KeyError if a needed tensor is missing)."""
    groups = {k.split(".")[1] for k in sd if k.startswith("blocks.group_")}
    blocks_g1 = {k.split(".")[2] for k in sd if k.startswith("blocks.group_1.block_")}
    w_in = sd["blocks.input.w"]
    return {"n_hid": int(w_in.shape[0]), "n_blk_per_group": len(blocks_g1), "group_count": len(groups),
            "input_channels": int(w_in.shape[1]), "vocab_size": int(sd["blocks.output.conv.w"].shape[0])}


# --------------------------------------------------------------------------------------------------
# Restricted loading of the original pickle.


class _PickledModule:
    """Inert stand-in for a pickled ``nn.Module``: keeps its ``__dict__`` (``_parameters``,
    ``_modules``, ...) and nothing else; it has no forward and runs no code of the original class."""

    dump_patches = False  # read by torch's legacy loader when it compares the saved class source

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


def _stand_in(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (_PickledModule,), {"pickled_class": qualname})


# Every module class a dall_e ``encoder.pkl`` names; each becomes a stand-in (no original code runs).
_MODULE_CLASSES = {
    ("dall_e.encoder", "Encoder"), ("dall_e.encoder", "EncoderBlock"), ("dall_e.utils", "Conv2d"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"), ("torch.nn.modules.linear", "Identity"),
}
_STAND_INS = {key: _stand_in(".".join(key)) for key in _MODULE_CLASSES}

# Data classes and tensor-rebuilding functions the file needs, resolved to the real objects; none of
# them can run arbitrary code. Storage classes are resolved by torch.load itself before this table.
_REAL_OBJECTS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "device"): torch.device,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
}

# Protocol-2 pickles written by Python 3 spell builtins the Python 2 way.
_MODULE_ALIASES = {"__builtin__": "builtins"}


def _restricted_pickle_module(path: str) -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose unpickler resolves only the allowlisted names."""

    class AllowlistUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            key = (_MODULE_ALIASES.get(module, module), name)
            if key in _STAND_INS:
                return _STAND_INS[key]
            if key in _REAL_OBJECTS:
                return _REAL_OBJECTS[key]
            raise UserError(
                f"{path}: refusing to unpickle {module}.{name}: a dall_e encoder.pkl names no such "
                "class; use the original encoder.pkl or a .safetensors file from util/convert_dvae.py")

    def load(file, **kwargs):
        return AllowlistUnpickler(file, **kwargs).load()

    mod = types.ModuleType("dvae_allowlist_pickle")
    mod.Unpickler = AllowlistUnpickler
    mod.load = load
    return mod


def _collect_state_dict(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Flatten a tree of stand-in modules into a state dict, as ``nn.Module.state_dict`` would."""
    state = obj.__dict__
    skip = state.get("_non_persistent_buffers_set", set())
    for group in ("_parameters", "_buffers"):
        for name, tensor in state.get(group, {}).items():
            if tensor is not None and name not in skip:
                out[prefix + name] = tensor.detach()
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            _collect_state_dict(child, f"{prefix}{name}.", out)


def read_dvae_pickle(path: str) -> dict[str, torch.Tensor]:
    """State dict of a pickled dall_e encoder (the whole module or its state dict), on CPU.

    Only the allowlisted classes are resolved; any other name raises ``UserError``.
    """
    with warnings.catch_warnings():
        # torch's legacy format compares the pickled class source with the stand-in's: expected to
        # differ (or to be unavailable for the generated stand-ins), so these warnings say nothing.
        warnings.simplefilter("ignore", category=torch.serialization.SourceChangeWarning)
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
        try:
            obj = torch.load(path, map_location="cpu", pickle_module=_restricted_pickle_module(path),
                             weights_only=False)
            sd: dict[str, torch.Tensor] = {}
            if isinstance(obj, _STAND_INS[("dall_e.encoder", "Encoder")]):
                _collect_state_dict(obj, "", sd)
                return sd
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a malformed file raises, it is the file's fault
            first = (str(e).strip().splitlines() or [""])[0]
            raise UserError(f"{path}: not a readable dVAE encoder pickle ({type(e).__name__}: {first})") from None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k: v.detach() for k, v in obj.items()}
    raise UserError(f"{path}: expected a pickled dall_e Encoder or its state dict, found {type(obj).__name__}")


# --------------------------------------------------------------------------------------------------
# safetensors, the format later runs load.

_SAFETENSORS_FORMAT = "dall_e_dvae_encoder"


def save_dvae_safetensors(encoder: DVAEEncoder, path: str) -> None:
    """Write the encoder's tensors to ``path``; the architecture sizes go in the header as JSON."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(sd, path, metadata={"format": _SAFETENSORS_FORMAT, "config": json.dumps(encoder.config)})


def read_dvae_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, int] | None]:
    """(state dict, architecture sizes from the header or None when the header has none)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    config = json.loads(meta["config"]) if "config" in meta else None
    return sd, config


def _is_safetensors(path: str) -> bool:
    """By content, not by name: 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def load_dvae_encoder(path: str) -> DVAEEncoder:
    """Build the encoder from ``encoder.pkl`` (original release) or a safetensors file (told apart by
    content); CPU, float32, eval mode, no gradients."""
    if not os.path.isfile(path):
        raise UserError(
            f"dVAE encoder weights not found: {path} (place the DALL-E encoder.pkl there, optionally "
            "convert it once with util/convert_dvae.py, or use --mim_target pixel)")
    if _is_safetensors(path):
        sd, config = read_dvae_safetensors(path)
    else:
        sd, config = read_dvae_pickle(path), None
    try:
        config = config or dvae_config_from_state_dict(sd)
        encoder = DVAEEncoder(**config)
        encoder.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"{path}: tensors do not form a DALL-E dVAE encoder ({type(e).__name__}: {e})") from e
    return encoder.eval().requires_grad_(False)


class DVAETokenizer(nn.Module):
    """Frozen dVAE encoder turning images into visual token ids.

    forward(images [B, 3, H, W] in [0, 1]) -> LongTensor [B, (H/8) * (W/8)] (row-major token grid).
    ``map_pixels`` is applied here, the one place it is applied. The encoder runs in float32 with
    autocast disabled and without gradients, whatever the caller's context; it stays in eval mode
    and holds no trainable parameter, so it is never part of the model or its checkpoints.
    """

    def __init__(self, encoder: DVAEEncoder):
        super().__init__()
        self.encoder = encoder.float().eval().requires_grad_(False)
        self._range_checked = False

    @classmethod
    def from_path(cls, path: str) -> "DVAETokenizer":
        return cls(load_dvae_encoder(path))

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    def train(self, mode: bool = True) -> "DVAETokenizer":
        return super().train(False)  # always eval: there is nothing to train and no dropout/BN state

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        if not self._range_checked:
            # Once per tokenizer (a host sync): normalised images fed here instead of [0, 1] ones give
            # plausible-looking but wrong targets, the silent failure this guards against.
            lo, hi = float(images.min()), float(images.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"dVAE tokenizer expects images in [0, 1] (map_pixels is applied "
                                 f"inside), got values in [{lo:.3f}, {hi:.3f}]")
            self._range_checked = True
        with torch.autocast(device_type=images.device.type, enabled=False):
            logits = self.encoder(map_pixels(images.float()))
        return logits.argmax(dim=1).flatten(1)
