"""The layout's rules, checked on the source: a pretraining mode is one file, dependencies point one way,
and every model (the dual encoder too) comes from the registry with its size settable by --model_kwargs."""
import ast
import json
import os

import pytest
import torch

import main_pretrain_cook
import modes
from models.registry import DUAL_ENCODER, create_model, model_names, model_options
from modes.text_mlm import TextMLM
from run_helpers import REPO, load_ckpt

# Command-line tools under util/ may import upward; every other util module is a library module.
UTIL_TOOLS = {"convert_beit_ckpt", "convert_vlmo_ckpt", "convert_dvae", "eval_itc", "forgetting_probe", "merge_lora",
              "make_pair_shards", "validate_pairs", "zero_shot", "retrieve"}
UPWARD = ("models", "custom_datasets", "modes", "tasks", "engine_pretrain", "main_pretrain_cook", "main_finetune",
          "inference")


def imported_roots(path):
    tree = ast.parse(open(path).read(), filename=path)
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def py_files(folder):
    d = os.path.join(REPO, folder)
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".py")]


def test_dependencies_point_one_way():
    bad = []
    for path in py_files("util"):
        if os.path.basename(path)[:-3] not in UTIL_TOOLS:
            bad += [(path, r) for r in imported_roots(path) & set(UPWARD)]
    for folder, forbidden in (("models", {"custom_datasets", "modes", "tasks", "engine_pretrain"}),
                              ("custom_datasets", {"models", "modes", "tasks", "engine_pretrain"})):
        bad += [(p, r) for p in py_files(folder) for r in imported_roots(p) & forbidden]
    bad += [(p, r) for p in py_files(".") if os.path.basename(p).startswith("engine")
            for r in imported_roots(p) & {"models", "custom_datasets", "modes", "tasks"}]
    assert not bad, bad


def test_no_file_over_400_lines():
    long = [(p, n) for folder in (".", "models", "modes", "tasks", "custom_datasets", "util")
            for p in py_files(folder) if (n := sum(1 for _ in open(p))) > 400]
    assert not long, long


def test_each_mode_is_one_file_declaring_its_path():
    assert modes.mode_names() == ["image_mim", "image_text_itc", "text_distill", "text_mlm"]
    for name in modes.mode_names():
        cls = modes.get_mode(name)
        assert cls.__module__ == f"modes.{name}" and cls.towers and cls.heads


def test_a_new_mode_is_one_registered_class(demo_data, tmp_path):
    """Registering a class is all it takes for --mode to train it (here: MLM on the text path with its own
    name and a 30% masking rate)."""
    @modes.register_mode
    class DenseMLM(TextMLM):
        name = "text_mlm_dense"

        def build_data(self, tokenizer, image_state, rank, world_size, grid):
            self.args.mlm_prob = 0.3
            return super().build_data(tokenizer, image_state, rank, world_size, grid)

    try:
        out = tmp_path / "run"
        code = main_pretrain_cook.main(["--mode", "text_mlm_dense", "--model", "vlmo_tiny_patch16", "--data_path",
                                        str(demo_data["captions_train"]), "--tokenizer", str(demo_data["tokenizer"]),
                                        "--output_dir", str(out), "--batch_size", "16", "--epochs", "1",
                                        "--num_workers", "0", "--max_text_len", "16", "--log_freq", "4"])
        assert code == 0
        assert load_ckpt(out / "checkpoint-latest.pth")["mode"] == "text_mlm_dense"
    finally:
        modes._MODES.pop("text_mlm_dense")


def test_every_model_comes_from_the_registry():
    assert DUAL_ENCODER in model_names()
    assert {"image_tower", "text_tower", "embed_dim", "text_tower_kwargs"} <= set(model_options(DUAL_ENCODER))
    with pytest.raises(KeyError, match="unknown option"):
        create_model("vlmo_tiny_patch16", widht=3)
    model = create_model(DUAL_ENCODER, image_tower="vit_tiny_patch16_224", text_tower="ours", embed_dim=8,
                         img_size=32, vocab_size=50, max_text_len=16,
                         image_tower_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2},
                         text_tower_kwargs={"width": 32, "depth": 1, "heads": 2})
    assert model.config["kind"] == DUAL_ENCODER and model.itc_image_proj.out_features == 8


def _args(demo_data, out, *extra):
    return ["--exp_name", "text_mlm", "--model", "vlmo_tiny_patch16", "--data_path", str(demo_data["captions_train"]),
            "--tokenizer", str(demo_data["tokenizer"]), "--output_dir", str(out), "--batch_size", "16", "--epochs", "1",
            "--num_workers", "0", "--max_text_len", "16", "--log_freq", "8", *extra]


def test_model_kwargs_set_any_size_and_are_recorded(demo_data, tmp_path):
    kwargs = {"embed_dim": 32, "depth": 3, "num_heads": 4, "patch_size": 8}
    out = tmp_path / "run"
    assert main_pretrain_cook.main(_args(demo_data, out, "--model_kwargs", json.dumps(kwargs))) == 0
    ckpt = load_ckpt(out / "checkpoint-latest.pth")
    assert {k: ckpt["model_config"][k] for k in kwargs} == kwargs
    assert ckpt["model"]["blocks.2.attn.qkv.weight"].shape == torch.Size([96, 32])
    with open(out / "args.json") as f:
        recorded = json.load(f)
    assert recorded["args"]["model_kwargs"] == kwargs and recorded["model_config"]["depth"] == 3


@pytest.mark.parametrize("value, message", [('{"widht": 3}', "--model_kwargs: unknown option(s) ['widht']"),
                                            ("{depth: 3}", "--model_kwargs: not valid JSON"),
                                            ("[3]", "--model_kwargs: expected a JSON object")])
def test_bad_model_kwargs_get_one_line(demo_data, tmp_path, capsys, value, message):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as e:
        main_pretrain_cook.main(_args(demo_data, out, "--model_kwargs", value))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not out.exists()
