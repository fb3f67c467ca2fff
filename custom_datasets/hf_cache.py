"""Hugging Face hub names (`bert-base-uncased`, `org/name`) resolved offline from the local HF cache.

The cache layout (huggingface_hub): `<cache>/models--<org>--<name>/refs/main` holds a commit hash and
`<cache>/models--<org>--<name>/snapshots/<hash>/` the files. The cache is `$HF_HUB_CACHE`, else
`$HF_HOME/hub`, else `~/.cache/huggingface/hub`. Nothing is downloaded.
"""
import os
import re
from pathlib import Path

from util.errors import UserError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def is_hub_name(text):
    """Whether `text` has the shape of a hub model name (and so is looked up when it is not a path)."""
    return bool(_HUB_NAME.match(text)) and not text.endswith((".txt", ".json"))


def hub_cache_dir():
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def snapshot_folder(name, revision="main"):
    """The snapshot folder of model `name` in the local cache, or a UserError saying where it looked."""
    cache = hub_cache_dir()
    repo = cache / ("models--" + name.replace("/", "--"))
    ref = repo / "refs" / revision
    how = (f"fetch it once where there is internet (`huggingface-cli download {name}`, or any "
           f"`from_pretrained({name!r})`) and point HF_HOME / HF_HUB_CACHE at that cache, or pass a vocab.txt")
    if not ref.is_file():
        raise UserError(f"{name}: not a file or folder, and not in the Hugging Face cache {cache} (no "
                        f"{ref.relative_to(cache)}); {how}")
    snapshot = repo / "snapshots" / ref.read_text().strip()
    if not snapshot.is_dir():
        raise UserError(f"{name}: the Hugging Face cache {cache} names snapshot {snapshot.name} in "
                        f"{ref.relative_to(cache)}, which is missing; {how}")
    return snapshot
