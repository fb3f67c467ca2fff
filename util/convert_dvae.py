"""Convert the DALL-E dVAE ``encoder.pkl`` once to ``encoder.safetensors``, which later runs load.

    python util/convert_dvae.py [--src checkpoints/dall_e_tokenizer_weight/encoder.pkl]
                                [--dst checkpoints/dall_e_tokenizer_weight/encoder.safetensors]

The pickle is read through the allowlisting unpickler of ``models/dvae.py`` (no ``dall_e`` package,
no unrestricted unpickling). The written file is checked by loading it back and comparing tensors.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models.dvae import load_dvae_encoder, save_dvae_safetensors  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402

DEFAULT_SRC = "checkpoints/dall_e_tokenizer_weight/encoder.pkl"
DEFAULT_DST = "checkpoints/dall_e_tokenizer_weight/encoder.safetensors"


def convert_dvae(src: str, dst: str) -> dict:
    """Write ``dst`` from ``src`` and return the architecture sizes; raises UserError on bad input."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise UserError(f"--src and --dst are the same file: {src}")
    encoder = load_dvae_encoder(src)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".tmp"
    save_dvae_safetensors(encoder, tmp)
    reloaded = load_dvae_encoder(tmp)
    ref, new = encoder.state_dict(), reloaded.state_dict()
    if ref.keys() != new.keys() or any(not torch.equal(ref[k], new[k]) for k in ref):
        os.remove(tmp)
        raise RuntimeError(f"round trip through {tmp} changed the tensors")
    os.replace(tmp, dst)  # atomic: a later run never sees a half-written file
    return encoder.config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=DEFAULT_SRC, help="original dall_e encoder.pkl")
    parser.add_argument("--dst", default=DEFAULT_DST, help="safetensors file to write")
    args = parser.parse_args(argv)
    config = convert_dvae(args.src, args.dst)
    n = sum(t.numel() for t in load_dvae_encoder(args.dst).state_dict().values())
    print(f"wrote {args.dst}: {n / 1e6:.1f}M parameters, {config}")
    return 0


if __name__ == "__main__":
    run_cli(main)
