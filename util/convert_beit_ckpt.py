"""Convert a BEiT checkpoint (unilm BEiT or timm ``Beit``) into this project's VLMo layout.

    python util/convert_beit_ckpt.py        # the defaults below: BEiT-base (22k, fine-tuned to 1k)
    python util/convert_beit_ckpt.py --src X.pth --dst Y.pth --model vlmo_large_patch16 \\
        --ffn_layout shared --img_size 384

Mapping (one function, ``convert_beit_state_dict``):
- patch embedding, CLS/mask tokens, attention (qkv without bias + q_bias/v_bias), norm1, layer
  scale and the final ``norm`` keep their names;
- ``blocks.i.mlp.*`` / ``norm2.*`` become the image expert ``mlp_imag`` / ``norm2_imag`` (multiway;
  ``--copy_mlp_to_text`` also seeds the text expert with them) or stay ``mlp`` / ``norm2`` (shared);
- relative position bias: per-layer tables (fine-tuned checkpoints) are kept, a shared
  ``rel_pos_bias`` table (MIM-only checkpoints) is copied into every layer (both present: summed,
  since both are added to the same attention logits), and tables are resized for another grid;
  ``relative_position_index`` is dropped (the model rebuilds it from its grid);
- a checkpoint without layer scale gets ``gamma = 1`` (the same function);
- classification / MIM heads (``head``, ``fc_norm``, ``lm_head``) and anything else unknown are
  dropped; the tensors the model has and BEiT lacks (text embeddings and experts, heads, ...) are
  left to the model's initialisation. Both lists are printed.

Output: ``{"model": state_dict, "model_config": dict, "source": str}``, loadable with
``torch.load(..., weights_only=True)`` and by ``--resume``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models.loading import grid_from_buckets, resize_patch_position_embedding  # noqa: E402
from models.registry import model_config as registry_model_config  # noqa: E402
from models.registry import backbone_names  # noqa: E402
from models.relative_position import resize_relative_position_table  # noqa: E402
from models.vlmo import VLMo  # noqa: E402
from util.checkpoint import extract_state_dict, save_atomic  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402

DEFAULT_SRC = "checkpoints/beit_base_patch16_224_pt22k_ft22kto1k.pth"
DEFAULT_DST = "checkpoints/beit_base_patch16_224_pt22k_ft22kto1k_transfertovlmo.pth"

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TABLE = "attn.relative_position_bias_table"
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def target_shapes(model_config: dict) -> tuple[dict[str, tuple], tuple[int, int]]:
    """({state-dict key: shape}, patch grid) of the model ``model_config`` describes, built on the
    meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = VLMo(model_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, tuple(model.grid_hw)


def _ffn_targets(rest: str, layout: str, copy_to_text: bool) -> list[str]:
    """Target names (block-relative) of a BEiT ``mlp.*`` / ``norm2.*`` tensor."""
    if layout == "shared":
        return [rest]
    part, _, leaf = rest.partition(".")
    names = [f"{part}_imag.{leaf}"]
    if copy_to_text:
        names.append(f"{part}_text.{leaf}")
    return names


def convert_beit_state_dict(sd: dict[str, torch.Tensor], model_config: dict, *,
                            copy_mlp_to_text: bool = False, source: str = "") -> tuple[dict, dict]:
    """BEiT state dict -> (state dict of the VLMo model ``model_config`` describes, report).

    ``sd`` may be nested under model/module/state_dict and carry a ``module.`` prefix.
    report: {"copied": [target keys filled from the source], "dropped": [(source key, why)],
    "created": [target keys left to the model's init], "filled": [(target key, why)],
    "rel_pos": "per_layer" | "shared" | "per_layer+shared" | "none",
    "resized": None or [source grid, target grid], "warnings": [str]}.
    Raises UserError when ``sd`` is not a BEiT checkpoint or does not fit the model.
    """
    where = f"{source}: " if source else ""
    flat = extract_state_dict(sd)
    if flat is None:
        raise UserError(f"{where}no tensor dictionary found (looked at the top level and under "
                        "model/module/state_dict); expected a BEiT checkpoint")
    if any(k.startswith("text_embeddings.") or "mlp_imag." in k for k in flat):
        raise UserError(f"{where}already in this project's VLMo layout; use it with --resume directly")
    if "patch_embed.proj.weight" not in flat or "blocks.0.attn.qkv.weight" not in flat:
        some = ", ".join(sorted(flat)[:4])
        raise UserError(f"{where}not a BEiT checkpoint: it lacks patch_embed.proj.weight / "
                        f"blocks.0.attn.qkv.weight (first keys: {some})")

    shapes, grid = target_shapes(model_config)
    depth = model_config["depth"]
    src_depth = 1 + max(int(m.group(1)) for k in flat if (m := _BLOCK_KEY.match(k)))
    if src_depth != depth:
        raise UserError(f"{where}BEiT checkpoint has {src_depth} blocks but {model_config['name']} has "
                        f"{depth}; pick the matching --model")
    layout = model_config["ffn_layout"]
    out: dict[str, torch.Tensor] = {}
    report = {"copied": [], "dropped": [], "created": [], "filled": [], "rel_pos": "none",
              "resized": None, "warnings": []}
    tables: dict[int, torch.Tensor] = {}
    shared_table = abs_pos = None

    def put(name: str, tensor: torch.Tensor, src_key: str) -> None:
        if name not in shapes:
            raise UserError(f"{where}{src_key}: {model_config['name']} has no {name}; not a BEiT (v1) "
                            "block layout")
        if tuple(tensor.shape) != shapes[name]:
            raise UserError(f"{where}{src_key} has shape {tuple(tensor.shape)} but {model_config['name']} "
                            f"expects {shapes[name]} for {name}; pick the matching --model")
        out[name] = tensor.clone()

    for key, tensor in flat.items():
        m = _BLOCK_KEY.match(key)
        rest = m.group(2) if m else key
        if rest.endswith("relative_position_index"):
            report["dropped"].append((key, "rebuilt by the model from its grid"))
        elif key == _SHARED_TABLE:
            shared_table = tensor
        elif m and rest == _TABLE:
            tables[int(m.group(1))] = tensor
        elif m and (rest.startswith("mlp.") or rest.startswith("norm2.")):
            for name in _ffn_targets(rest, layout, copy_mlp_to_text):
                put(f"blocks.{m.group(1)}.{name}", tensor, key)
        elif key in shapes:
            put(key, tensor, key)
        elif key == "pos_embed" and "image_pos_embed" in shapes:
            abs_pos = tensor
        elif key == "pos_embed":
            report["dropped"].append((key, "absolute position embedding: the model has none"))
            report["warnings"].append("the source uses an absolute position embedding, which the model "
                                      "lacks: its outputs will differ from the source's until trained")
        else:
            report["dropped"].append((key, "not part of the model"))

    # Relative position bias: one table per layer, in the model's grid.
    if tables or shared_table is not None:
        report["rel_pos"] = "+".join(n for n, on in (("per_layer", tables), ("shared", shared_table is not None))
                                     if on)
        for i in range(depth):
            parts = [t for t in (tables.get(i), shared_table) if t is not None]
            if tables and i not in tables:
                report["warnings"].append(f"blocks.{i} has no relative position table of its own")
            if not parts:
                continue
            src_key = f"blocks.{i}.{_TABLE}" if i in tables else _SHARED_TABLE
            table = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            try:
                src_grid = grid_from_buckets(table.shape[0])
            except ValueError as e:
                raise UserError(f"{where}{src_key}: {e}") from None
            if src_grid != grid:
                report["resized"] = [list(src_grid), list(grid)]
                table = resize_relative_position_table(table, src_grid, grid)
            put(f"blocks.{i}.{_TABLE}", table, src_key)

    # BEiT's absolute positions [1, 1+N, D] (CLS first): the CLS entry folds into cls_token (both are added to
    # the same token), the patch entries become image_pos_embed, stored divided by the model's gain.
    if abs_pos is not None:
        patches = abs_pos[:, 1:]
        if patches.shape[1] != shapes["image_pos_embed"][1]:
            patches = resize_patch_position_embedding(patches, grid)
            report["resized"] = report["resized"] or "pos_embed"
        put("image_pos_embed", patches / model_config["image_pos_gain"], "pos_embed")
        if "cls_token" in out:
            out["cls_token"] = out["cls_token"] + abs_pos[:, :1]

    # No layer scale in the source is the same function as a layer scale of one.
    for i in range(depth):
        for g in ("gamma_1", "gamma_2"):
            name = f"blocks.{i}.{g}"
            if name in shapes and name not in out:
                out[name] = torch.ones(shapes[name], dtype=flat["blocks.0.attn.qkv.weight"].dtype)
                report["filled"].append((name, "set to 1: the source has no layer scale"))

    report["copied"] = sorted(k for k in out if k not in dict(report["filled"]))
    report["created"] = sorted(k for k in shapes if k not in out)
    return out, report


def summarize_keys(keys) -> list[str]:
    """Compact listing: tensors grouped by module, block indices collapsed, e.g.
    ['blocks.{0..11}.mlp_text.fc1.{bias,weight}', 'head.{bias,weight}', 'logit_scale']."""
    groups: dict[str, tuple[set, set]] = {}
    for k in keys:
        m = _BLOCK_KEY.match(k)
        body, block = (m.group(2), int(m.group(1))) if m else (k, None)
        module, _, leaf = body.rpartition(".")
        if m:
            module = f"blocks.#.{module}" if module else "blocks.#"
        blocks, leaves = groups.setdefault(module or leaf, (set(), set()))
        if block is not None:
            blocks.add(block)
        if module:
            leaves.add(leaf)
    lines = []
    for name, (blocks, leaves) in sorted(groups.items()):
        if blocks:
            ids = sorted(blocks)
            span = str(ids[0]) if len(ids) == 1 else (
                f"{{{ids[0]}..{ids[-1]}}}" if ids == list(range(ids[0], ids[-1] + 1)) else
                "{" + ",".join(map(str, ids)) + "}")
            name = name.replace("#", span)
        if leaves:
            name += "." + (next(iter(leaves)) if len(leaves) == 1 else "{" + ",".join(sorted(leaves)) + "}")
        lines.append(name)
    return lines


def load_beit_checkpoint(path: str, what: str = "BEiT"):
    """torch.load with weights_only=True; argparse.Namespace (the training args some BEiT releases
    carry) is allowed as a plain attribute holder."""
    if not os.path.isfile(path):
        raise UserError(f"--src {path}: file not found; download the {what} checkpoint and place it there")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means this is not a plain checkpoint
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--src {path}: cannot read it as a PyTorch checkpoint ({first})") from None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Convert a BEiT checkpoint to the VLMo layout.")
    parser.add_argument("--src", default=DEFAULT_SRC, help="BEiT checkpoint (.pth)")
    parser.add_argument("--dst", default=DEFAULT_DST, help="converted checkpoint to write")
    parser.add_argument("--model", default="vlmo_base_patch16", help=f"one of {', '.join(backbone_names())}")
    parser.add_argument("--ffn_layout", default="multiway", choices=("multiway", "shared"))
    parser.add_argument("--copy_mlp_to_text", action="store_true",
                        help="multiway: also initialise the text expert from BEiT's FFN")
    parser.add_argument("--img_size", type=int, default=None,
                        help="image size the model will run at (relative position tables are resized)")
    args = parser.parse_args(argv)
    if args.copy_mlp_to_text and args.ffn_layout != "multiway":
        raise UserError("--copy_mlp_to_text applies to --ffn_layout multiway only")
    overrides = {"ffn_layout": args.ffn_layout}
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    try:
        config = registry_model_config(args.model, **overrides)
    except KeyError as e:
        raise UserError(f"--model {args.model}: {e.args[0]}") from None
    if config["img_size"] % config["patch_size"]:
        raise UserError(f"--img_size {config['img_size']} is not a multiple of the patch size "
                        f"{config['patch_size']}")

    obj = load_beit_checkpoint(args.src)
    new_sd, report = convert_beit_state_dict(obj, config, copy_mlp_to_text=args.copy_mlp_to_text,
                                             source=f"--src {args.src}")
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    save_atomic({"model": new_sd, "model_config": config, "source": args.src}, args.dst)

    print(f"converted {args.src} -> {args.dst} ({config['name']}, ffn_layout={args.ffn_layout})")
    print(f"  copied {len(report['copied'])} tensors; relative position bias: {report['rel_pos']}"
          + (f", resized {report['resized'][0]} -> {report['resized'][1]}" if report["resized"] else ""))
    print(f"  dropped ({len(report['dropped'])}):")
    for line in summarize_keys(k for k, _ in report["dropped"]):
        print(f"    {line}")
    print_filled_created_warnings(report)
    return report


def print_filled_created_warnings(report) -> None:
    """The tail of a converter's report: layer scales filled, tensors left to the model's init, warnings."""
    for key, why in report["filled"][:1]:
        print(f"  filled {len(report['filled'])} layer-scale tensors ({why})")
    print(f"  newly created, left to the model's initialisation ({len(report['created'])}):")
    for line in summarize_keys(report["created"]):
        print(f"    {line}")
    for w in report["warnings"]:
        print(f"  WARNING: {w}")


if __name__ == "__main__":
    run_cli(main)
