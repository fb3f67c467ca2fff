"""Turn a LoRA training checkpoint into a merged weights file (W0 + B A * alpha / r, no `lora_*` tensors).

    python util/merge_lora.py --src outputs/text_mlm/checkpoint-latest.pth
    python util/merge_lora.py --src outputs/text_mlm/checkpoint-100.pth --dst checkpoints/text_mlm_merged.pth

Writes (atomically) {"model", "model_config", "tokenizer", "image_preprocess", "source",
"merged_from_lora_rank", "merged_from_mode", "trained_heads"}, loadable with `weights_only=True` and by
`main_pretrain_cook.py --resume` in any mode; a later `--lora_rank R` run starts fresh adapters (B = 0)
on the merged weights. alpha comes from the checkpoint's recorded args (`lora_alpha`, default 1.0).
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.merge import has_lora, lora_layers_in, lora_ranks, merge_lora_state_dict  # noqa: E402
from util.checkpoint import extract_state_dict, load_file, save_atomic  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402

# Head name -> (state-dict prefix, modes whose runs train it).
HEADS = {"mlm": ("mlm_head.", ("text_mlm",)), "mim": ("mim_head.", ("image_mim",)),
         "itc": ("itc_image_proj.", ("image_text_itc",))}


def trained_heads(ckpt):
    """Heads of a checkpoint that hold trained (not freshly initialised) weights, as a sorted list.

    A training checkpoint saves every head, trained or not, so presence alone says nothing: a head counts
    when the run's mode trains it, when the run loaded it from its --resume file (`provided_keys`), or when
    a merged file records it (`trained_heads`). A plain weights file without provenance (an external or
    converted checkpoint) counts every head it holds.
    """
    sd = extract_state_dict(ckpt) or {}
    present = {h for h, (prefix, _) in HEADS.items() if any(k.startswith(prefix) for k in sd)}
    if not isinstance(ckpt, dict) or ("mode" not in ckpt and "trained_heads" not in ckpt):
        return sorted(present)
    provided = set(ckpt.get("provided_keys") or [])
    recorded = set(ckpt.get("trained_heads") or [])
    heads = set()
    for h in present:
        prefix, modes = HEADS[h]
        if ckpt.get("mode") in modes or h in recorded or any(k.startswith(prefix) for k in provided):
            heads.add(h)
    return sorted(heads)


def lora_alpha_of(ckpt):
    """alpha the run used (its recorded args), 1.0 when not recorded (the default of the original work)."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    alpha = args.get("lora_alpha") if isinstance(args, dict) else None
    return float(alpha) if alpha is not None else 1.0


def merged_checkpoint(ckpt, source="", lora_alpha=None):
    """(merged file dict, report) from a checkpoint dict holding a state dict with LoRA adapters.

    ckpt: a training checkpoint as saved by main_pretrain_cook.py, or any dict with "model" (and
    optionally "model_config", "args", "tokenizer", "image_preprocess", "mode", "provided_keys").
    report: {"layers": [prefixes], "rank": int, "alpha": float, "scale": float}.
    Raises UserError when there is no state dict or it holds no adapters.
    """
    where = f"{source}: " if source else ""
    sd = extract_state_dict(ckpt)
    if sd is None:
        raise UserError(f"{where}no model weights found (expected a state dict under 'model'); not a checkpoint "
                        "of this project")
    if not has_lora(sd):
        raise UserError(f"{where}holds no LoRA adapters (no lora_A/lora_B tensors): nothing to merge; use it "
                        "with --resume as it is")
    refuse_partial_merge(ckpt, where)
    alpha = lora_alpha_of(ckpt) if lora_alpha is None else float(lora_alpha)
    ranks = sorted(set(lora_ranks(sd).values()))
    try:
        merged = merge_lora_state_dict(sd, alpha)
    except ValueError as e:
        raise UserError(f"{where}{e}") from None
    rank = ranks[0] if len(ranks) == 1 else ranks
    out = {"model": merged, "model_config": ckpt.get("model_config"), "tokenizer": ckpt.get("tokenizer"),
           "image_preprocess": ckpt.get("image_preprocess"), "source": source, "merged_from_lora_rank": rank,
           "merged_from_mode": ckpt.get("mode"), "trained_heads": trained_heads(ckpt)}
    report = {"layers": lora_layers_in(sd), "rank": rank, "alpha": alpha,
              "scale": alpha / ranks[0] if len(ranks) == 1 else None}
    return out, report


def locked_tower_of(args, model_config):
    """The tower a LoRA run locked while its adapters sat on layers that tower shares (the multiway
    model's attention), or None. Such adapters served the other modality only; a dual encoder's towers share
    nothing, so its adapters merge exactly."""
    from models.dual_encoder import is_dual_encoder_config

    if is_dual_encoder_config(model_config) or not int((args or {}).get("lora_rank") or 0):
        return None
    return next((t for t in ("image", "text") if (args or {}).get(f"lock_{t}")), None)


def refuse_partial_merge(ckpt, where=""):
    locked = locked_tower_of(ckpt.get("args"), ckpt.get("model_config"))
    if locked:
        other = "text" if locked == "image" else "image"
        raise UserError(f"{where}its LoRA adapters were trained with --lock_{locked} on attention layers that "
                        f"{locked} tokens share, so they act on {other} tokens only; merged into the weights they "
                        f"would change the locked {locked} tower. Use the checkpoint as it is: --resume and "
                        "util/eval_itc.py load it with its adapters")


def write_merged(ckpt, dst, source="", lora_alpha=None):
    """Merge `ckpt` (a checkpoint dict, see merged_checkpoint) and save it atomically to `dst`; returns the
    report. For the end of a LoRA training run (rank 0 only):
    `write_merged(state, os.path.join(output_dir, "checkpoint-merged.pth"), source=...)`."""
    merged, report = merged_checkpoint(ckpt, source, lora_alpha)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    save_atomic(merged, dst)
    return report


def default_dst(src):
    stem, _ = os.path.splitext(src)
    return f"{stem}_merged.pth"


def main(argv=None):
    p = argparse.ArgumentParser(description="Merge the LoRA adapters of a training checkpoint into its weights.")
    p.add_argument("--src", required=True, help="training checkpoint with LoRA adapters (e.g. checkpoint-latest.pth)")
    p.add_argument("--dst", default=None, help="merged file to write (default: <src stem>_merged.pth)")
    p.add_argument("--lora_alpha", type=float, default=None,
                   help="override alpha (default: the checkpoint's recorded --lora_alpha, else 1.0)")
    args = p.parse_args(argv)
    dst = args.dst or default_dst(args.src)
    if os.path.abspath(dst) == os.path.abspath(args.src):
        raise UserError(f"--dst {dst}: same file as --src; choose another name")
    ckpt = load_file(args.src, "--src")
    if not isinstance(ckpt, dict):
        raise UserError(f"--src {args.src}: not a checkpoint dictionary")
    report = write_merged(ckpt, dst, source=args.src, lora_alpha=args.lora_alpha)
    how = f"rank {report['rank']}, alpha {report['alpha']:g}" + \
        (f", scale {report['scale']:g}" if report["scale"] is not None else "")
    print(f"merged {len(report['layers'])} LoRA layers of {args.src} ({how}) -> {dst}")
    for prefix in _summarize(report["layers"]):
        print(f"  {prefix}")
    print("  lora_A/lora_B removed; resume from the merged file with --resume (a new --lora_rank starts fresh "
          "adapters)")
    return {"dst": dst, **report}


def _summarize(layers):
    """Group 'blocks.i.<rest>' names over i for printing."""
    from util.convert_beit_ckpt import summarize_keys

    return summarize_keys(f"{name}.weight" for name in layers)


if __name__ == "__main__":
    run_cli(main)
