"""Command-line parsing with YAML defaults (`--config`), and run provenance for `args.json`."""
import argparse
import json
import os
import platform
import subprocess
import sys

import yaml

from util.errors import UserError
from util.flag_checks import Bounded, check_config_values, fraction, non_negative_float, positive_float, positive_int


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, no usage dump) instead of exiting."""

    def error(self, message):
        if message.endswith("expected one argument"):  # e.g. `--blr -1e-4`: argparse reads -1e-4 as a flag
            message += "; a value that starts with '-' is written --flag=-value"
        raise UserError(message)


def make_parser(description):
    p = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of defaults (flags given on the command line win)")
    # `python -m torch.distributed.launch` passes --local-rank=N (older torch: --local_rank N); the rank is read
    # from the environment it also sets (LOCAL_RANK), as under torchrun
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def add_run_args(group):
    """Flags every training entry point takes: logging, seed, precision, device, process-group backend."""
    group.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    group.add_argument("--seed", type=int, default=0, help="seeds the data order, masking, augmentation and init")
    group.add_argument("--log_freq", type=positive_int(), default=20, help="optimizer steps between log lines")
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    group.add_argument("--dist_backend", default=None, help="default: nccl with CUDA, gloo on CPU")


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def add_scale_args(group, fsdp=False):
    """The opt-in scale levers (models/checkpointing.py, models/sharding.py), applied in this order."""
    group.add_argument("--grad_checkpointing", type=Bounded(int, 0), nargs="?", const=1, default=0, metavar="K",
                       help="activation checkpointing of every K-th block (the flag alone: every block): less "
                            "activation memory for about one more forward")
    group.add_argument("--compile", nargs="?", const="inductor", default=None, choices=COMPILE_BACKENDS,
                       help="torch.compile each transformer block (the flag alone: inductor; aot_eager to check a "
                            "model compiles without code generation), after activation checkpointing")
    if fsdp:
        group.add_argument("--fsdp", action="store_true",
                           help="FSDP2: shard parameters, gradients and optimizer state over the ranks (each block, "
                                "then the root) instead of DDP; checkpoints become sharded folders (*.dcp) that "
                                "every rank writes; util/convert_dcp.py converts to one file and back")


def add_optimizer_args(group, epochs, warmup_epochs, blr, betas):
    """Optimisation flags of both entry points (defaults differ between pretraining and fine-tuning)."""
    group.add_argument("--batch_size", type=positive_int(), default=64, help="per process, per accumulation step")
    group.add_argument("--accum_iter", type=positive_int(), default=1, help="micro-batches per optimizer step")
    group.add_argument("--epochs", type=positive_int(), default=epochs, help="passes over the training data")
    group.add_argument("--warmup_epochs", type=non_negative_float(), default=warmup_epochs, help="linear lr warmup, then cosine")
    group.add_argument("--blr", type=positive_float(), default=blr, help="lr = blr * effective batch / 256")
    group.add_argument("--lr", type=non_negative_float(), default=None, help="absolute lr (overrides --blr)")
    group.add_argument("--min_lr", type=non_negative_float(), default=1e-6, help="lr at the end of the cosine schedule")
    group.add_argument("--weight_decay", type=non_negative_float(), default=0.05, help="AdamW decoupled weight decay")
    group.add_argument("--opt_betas", type=fraction(open_high=True), nargs=2, default=list(betas), help="AdamW betas")
    group.add_argument("--clip_grad", type=non_negative_float(), default=None,
                       help="clip the gradient norm to this; 0: off (default: off, image_text_itc 1.0)")


def parse_with_config(parser, argv):
    """Parse argv; values from `--config FILE` replace the parser's defaults, explicit flags still win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        if not os.path.isfile(pre.config):
            raise UserError(f"--config: file not found: {pre.config}")
        try:
            with open(pre.config) as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--config {pre.config}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise UserError(f"--config {pre.config}: expected a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"--config {pre.config}: unknown option(s) {unknown}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    check_config_values(parser, args, pre.config)
    return args


def git_commit():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions():
    """Installed versions, read from the package metadata (importing timm, torchvision and webdataset only to
    read their versions cost every run about 1.5 s)."""
    from importlib import metadata

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("torchvision", "timm", "tokenizers", "safetensors", "numpy", "webdataset"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # an optional library missing is just not recorded
            versions[name] = None
    return versions


def write_args_json(path, args, argv, world_size, extra=None):
    record = {"args": vars(args), "argv": list(sys.argv if argv is None else argv), "world_size": world_size,
              "git_commit": git_commit(), "versions": library_versions(), **(extra or {})}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, default=str)
        os.replace(tmp, path)
    except OSError as e:
        from util.checkpoint import failure_reason
        from util.errors import WriteFailed

        if os.path.exists(tmp):
            os.remove(tmp)
        raise WriteFailed(f"{failure_reason(e)} writing {path}") from None


def plain_args(d):
    """args as str/int/float/bool/None/list only (checkpoints load with weights_only=True); a mapping (e.g.
    --model_kwargs from a YAML config) is kept as its JSON text."""
    def plain(v):
        if isinstance(v, (str, int, float, bool, type(None))):
            return v
        if isinstance(v, (list, tuple)):
            return list(v)
        return json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v)
    return {k: plain(v) for k, v in d.items()}


def json_mapping(value, flag):
    """A JSON-object flag (--model_kwargs, --image_tower_kwargs, ...): JSON text on the command line, a
    mapping in --config; None -> {}."""
    if value is None or isinstance(value, dict):
        return dict(value or {})
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag}: not valid JSON ({e.msg}); e.g. {flag} '{{\"depth\": 2}}'") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{flag}: expected a JSON object, e.g. '{{\"depth\": 2}}'")
    return parsed
