"""Where the DALL-E tokenizer weights of an image_mim run are read from (kept here, with no upward imports,
because users' scripts import `util.run_setup.dvae_file`)."""
import os

from util.errors import UserError


def dvae_file(path):
    """The safetensors conversion beside an encoder.pkl is preferred (no unpickling at all)."""
    converted = os.path.splitext(path)[0] + ".safetensors"
    if path.endswith(".pkl") and os.path.isfile(converted):
        return converted
    if not os.path.isfile(path):
        raise UserError(f"--dvae_path: DALL-E tokenizer weights not found: {path}. Place encoder.pkl there (from "
                        "the DALL-E release), convert it once with `python util/convert_dvae.py`, or use "
                        "--mim_target pixel")
    return path
