"""``hf-comet`` never shows a traceback for a user's mistake: every class of bad invocation (bad paths, damaged
checkpoints, bad evaluation batches, non-finite numbers, conflicting flags, misused fields) exits 2 with
``hf-comet <command>: error: ...`` naming the bad value, and writes or damages nothing.

Most cases call `hf_comet.cli.main` in-process (one import for all); `test_real_processes_print_no_traceback` runs a
few through ``python -m hf_comet.cli`` to show the terminal gets the message and no traceback."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_comet.cli import main
from hf_comet.convert import convert_to_moe

ROOT = Path(__file__).resolve().parents[1]

GPT2 = dict(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64, bos_token_id=1, eos_token_id=2)
BERT = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128, vocab_size=64)
BERT |= dict(max_position_embeddings=32, num_labels=3)
VIT = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128, image_size=8)
VIT |= dict(patch_size=4, num_channels=1, num_labels=3)


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def _edit_weights(source: Path, target: Path, edit) -> None:
    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    edit(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Every source, checkpoint and batch the cases point at; nothing in it may change."""
    root = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    gpt2 = _save(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)), root / "gpt2")
    _save(transformers.GPT2Model(transformers.GPT2Config(**GPT2)), root / "gpt2_base")
    _save(transformers.BertForSequenceClassification(transformers.BertConfig(**BERT)), root / "bert")
    _save(transformers.ViTForImageClassification(transformers.ViTConfig(**VIT)), root / "vit")
    moe = convert_to_moe(gpt2, "upcycle", num_experts=4)
    moe.save_pretrained(root / "moe")
    shutil.copytree(root / "moe", root / "moe_nocard")
    (root / "moe_nocard" / "README.md").unlink()
    # damaged dense sources and MoE checkpoints
    for name in ("gpt2", "moe_nocard"):
        base = root / name
        truncated = shutil.copytree(base, root / f"{name}_truncated")
        data = (truncated / "model.safetensors").read_bytes()
        (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
        garbage = shutil.copytree(base, root / f"{name}_garbage")
        (garbage / "model.safetensors").write_bytes(os.urandom(4096))
        bad_json = shutil.copytree(base, root / f"{name}_badjson")
        (bad_json / "config.json").write_text('{"model_type": "gpt2", ')
        no_weights = shutil.copytree(base, root / f"{name}_noweights")
        (no_weights / "model.safetensors").unlink()
    _edit_weights(gpt2, root / "missing_ffn", lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"))
    _edit_weights(
        gpt2, root / "extra_ffn", lambda s: s.update({"transformer.h.2.mlp.c_fc.weight": torch.zeros(32, 128)})
    )
    _edit_weights(
        gpt2, root / "mismatch", lambda s: s.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(32, 100)})
    )
    expert = next(k for k in load_file(root / "moe_nocard" / "model.safetensors") if "experts.up_proj" in k)
    _edit_weights(root / "moe_nocard", root / "moe_missing_expert", lambda s: s.pop(expert))
    pickled = shutil.copytree(gpt2, root / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    not_dict = shutil.copytree(gpt2, root / "config_list")
    (not_dict / "config.json").write_text("[1, 2]")
    for name, field, value in [("config_nan", "layer_norm_epsilon", float("nan")), ("config_type", "n_embd", "abc")]:
        edited = shutil.copytree(gpt2, root / name)
        (edited / "config.json").write_text(
            json.dumps({**json.loads((gpt2 / "config.json").read_text()), field: value})
        )
    edited = shutil.copytree(root / "moe_nocard", root / "moe_inf")
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "router_aux_loss_coef": float("inf")}))
    sharded = shutil.copytree(gpt2, root / "sharded")
    index = {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "model.safetensors").unlink()
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a checkpoint")
    (root / "weights_dir").mkdir()
    shutil.copy(gpt2 / "config.json", root / "weights_dir" / "config.json")
    (root / "weights_dir" / "model.safetensors").mkdir()
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "link_to_moe").symlink_to(root / "moe")
    readme_dir = shutil.copytree(root / "moe_nocard", root / "moe_readme_dir")
    (readme_dir / "README.md").mkdir()
    # run folders with the wrong kind of entry
    (root / "run_with_file").mkdir()
    (root / "run_with_file" / "comet").write_text("a file where a checkpoint folder goes")
    (root / "run_link").symlink_to(root / "empty")
    (root / "run_foreign" / "comet").mkdir(parents=True)
    (root / "run_foreign" / "comet" / "notes.txt").write_text("the user's own file")
    # evaluation batches
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 8), generator=g)
    batches = {
        "good": {"input_ids": ids, "labels": ids},
        "unknown_key": {"input_ids": ids, "labels": ids, "pixel_values": torch.zeros(2, 1, 8, 8)},
        "no_labels": {"input_ids": ids},
        "float_ids": {"input_ids": ids.float(), "labels": ids},
        "out_of_vocab": {"input_ids": ids + 100, "labels": ids},
        "too_long": {"input_ids": torch.randint(3, 64, (2, 40), generator=g), "labels": torch.zeros(2, 40).long()},
        "flat": {"input_ids": ids[0], "labels": ids[0]},
        "mask_shape": {"input_ids": ids, "attention_mask": torch.ones(2, 5).long(), "labels": ids},
        "label_range": {"input_ids": ids, "labels": ids + 1000},
        "bert_labels": {"input_ids": ids, "labels": torch.tensor([0, 7])},
        "bert_label_shape": {"input_ids": ids, "labels": ids},
        "vit_nan": {"pixel_values": torch.full((2, 1, 8, 8), float("nan")), "labels": torch.tensor([0, 1])},
        "vit_shape": {"pixel_values": torch.zeros(2, 3, 16, 16), "labels": torch.tensor([0, 1])},
    }
    for name, tensors in batches.items():
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, root / f"{name}.safetensors")
    torch.save(batches["good"], root / "pickle.pt")
    (root / "garbage.safetensors").write_bytes(os.urandom(1000))
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its kind and content hash (links by their target)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


CONVERT = ["convert", "--no-progress"]
REPORT = [*CONVERT, "--report-only"]
CASES = [
    # -- convert: the source ------------------------------------------------------------------------------------
    ("src-missing", [*CONVERT, "{r}/nowhere", "{r}/out"], "'{r}/nowhere' does not exist"),
    ("src-missing-relative", [*CONVERT, "no/such/dir", "{r}/out"], "'no/such/dir' does not exist"),
    ("src-missing-or-hub", [*CONVERT, "nosuchorg/nomodel", "{r}/out"], "'nosuchorg/nomodel' is not a local path"),
    ("src-dangling-link", [*CONVERT, "{r}/dangling", "{r}/out"], "is a symlink to"),
    ("src-parent-is-file", [*CONVERT, "{r}/a_file/x", "{r}/out"], "'{r}/a_file' is a file"),
    ("src-is-file", [*CONVERT, "{r}/a_file", "{r}/out"], "'{r}/a_file' is a file, not a folder"),
    ("src-no-config", [*CONVERT, "{r}/empty", "{r}/out"], "'{r}/empty' has no config.json"),
    ("src-bad-json", [*CONVERT, "{r}/gpt2_badjson", "{r}/out"], "config.json' is not valid JSON"),
    ("src-config-not-object", [*CONVERT, "{r}/config_list", "{r}/out"], "is not a transformers config"),
    ("src-config-nan", [*CONVERT, "{r}/config_nan", "{r}/out"], "sets layer_norm_epsilon to a non-finite number"),
    ("src-config-type", [*CONVERT, "{r}/config_type", "{r}/out"], "Field 'n_embd' expected int, got str"),
    ("src-no-weights", [*CONVERT, "{r}/gpt2_noweights", "{r}/out"], "'{r}/gpt2_noweights' has no weights"),
    ("src-truncated", [*CONVERT, "{r}/gpt2_truncated", "{r}/out"], "gpt2_truncated/model.safetensors' is not a whole"),
    ("src-garbage", [*CONVERT, "{r}/gpt2_garbage", "{r}/out"], "gpt2_garbage/model.safetensors' is not a whole"),
    ("src-weights-dir", [*CONVERT, "{r}/weights_dir", "{r}/out"], "weights_dir/model.safetensors' is missing or not"),
    ("src-pickled", [*CONVERT, "{r}/pickled", "{r}/out"], "only pickled weights (pytorch_model.bin)"),
    ("src-missing-shard", [*CONVERT, "{r}/sharded", "{r}/out"], "model-00001-of-00002.safetensors' is missing"),
    ("src-missing-ffn", [*CONVERT, "{r}/missing_ffn", "{r}/out"], "transformer.h.1.mlp.c_fc.weight"),
    ("src-extra-ffn", [*CONVERT, "{r}/extra_ffn", "{r}/out"], "FFN weights GPT2LMHeadModel does not read"),
    ("src-mismatch", [*CONVERT, "{r}/mismatch", "{r}/out"], "transformer.h.0.mlp.c_fc.weight (32, 100)"),
    ("src-already-moe", [*CONVERT, "{r}/moe", "{r}/out"], "model_type='comet_gpt2'"),
    # -- convert: the destination -------------------------------------------------------------------------------
    ("dst-is-file", [*CONVERT, "{r}/gpt2", "{r}/a_file"], "destination '{r}/a_file' is a file"),
    ("dst-exists", [*CONVERT, "{r}/gpt2", "{r}/moe"], "pass --overwrite"),
    ("dst-symlink", [*CONVERT, "{r}/gpt2", "{r}/link_to_moe", "--overwrite"], "'{r}/link_to_moe' is a symlink"),
    ("dst-parent-file", [*CONVERT, "{r}/gpt2", "{r}/a_file/out"], "'{r}/a_file' is a file, not a folder"),
    ("dst-not-checkpoint", [*CONVERT, "{r}/gpt2", "{r}/run_foreign", "--overwrite"], "no config.json, so it is not"),
    ("dst-is-source", [*CONVERT, "{r}/gpt2", "{r}/gpt2", "--overwrite"], "overlap"),
    ("dst-inside-source", [*CONVERT, "{r}/gpt2", "{r}/gpt2/moe"], "overlap"),
    ("dst-empty", [*CONVERT, "{r}/gpt2", ""], "destination is empty"),
    # -- convert: flags -----------------------------------------------------------------------------------------
    ("split-method-with-comet", [*CONVERT, "{r}/gpt2", "{r}/out", "--split-method", "kmeans"], "--split-method kmeans"),
    ("report-only-overwrite", [*REPORT, "{r}/gpt2", "{r}/out", "--overwrite"], "--overwrite has no effect"),
    ("sweep-without-report", [*CONVERT, "{r}/gpt2", "{r}/out", "--sweep", "0.5"], "--sweep only applies"),
    (
        "eval-without-report",
        [*CONVERT, "{r}/gpt2", "{r}/out", "--eval-inputs", "{r}/good.safetensors"],
        "--eval-inputs only",
    ),
    ("keep-rate-nan", [*CONVERT, "{r}/gpt2", "{r}/out", "--comet-keep-rate", "nan"], "'nan' is not a finite number"),
    ("coef-inf", [*CONVERT, "{r}/gpt2", "{r}/out", "--router-aux-loss-coef", "inf"], "'inf' is not a finite"),
    ("sweep-nan", [*REPORT, "{r}/gpt2", "{r}/out", "--sweep", "0.5,nan"], "'nan' is not a finite number"),
    ("sweep-empty-item", [*REPORT, "{r}/gpt2", "{r}/out", "--sweep", "0.5,"], "'0.5,' is not a comma-separated"),
    ("sweep-keep-rate", [*REPORT, "{r}/gpt2", "{r}/out", "--sweep", "1.5"], "sweep 1.5: a COMET keep rate is in (0, 1]"),
    ("sweep-fraction-k", [*REPORT, "{r}/gpt2", "{r}/out", "--method", "upcycle", "--sweep", "2.5"], "sweep 2.5: with method upcycle"),
    (
        "sweep-k-too-big",
        [*REPORT, "{r}/gpt2", "o", "--method", "upcycle", "--num-experts", "4", "--sweep", "8"],
        "than the 4 experts",
    ),
    ("seed-negative", [*CONVERT, "{r}/gpt2", "{r}/out", "--seed", "-1"], "'-1' is outside the seed range"),
    ("seed-nan", [*CONVERT, "{r}/gpt2", "{r}/out", "--seed", "nan"], "'nan' is not an integer seed"),
    ("moe-layers-empty", [*CONVERT, "{r}/gpt2", "{r}/out", "--moe-layers", ","], "',' is not a comma-separated"),
    (
        "experts-not-dividing",
        [*CONVERT, "{r}/gpt2", "{r}/out", "--method", "split", "--num-experts", "3"],
        "does not divide",
    ),
    # -- convert: the evaluation batch --------------------------------------------------------------------------
    ("eval-pickle", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/pickle.pt"], "pickle.pt' is not a safetensors"),
    ("eval-garbage", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/garbage.safetensors"], "not a safetensors"),
    ("eval-missing", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/none.safetensors"], "none.safetensors' does"),
    ("eval-dir", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/empty"], "'{r}/empty' is a folder, not a file"),
    ("eval-unknown-key", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/unknown_key.safetensors"], "pixel_values"),
    ("eval-no-labels", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/no_labels.safetensors"], "lacks ['labels']"),
    ("eval-float-ids", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/float_ids.safetensors"], "torch.float32"),
    ("eval-vocab", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/out_of_vocab.safetensors"], "vocab_size=64"),
    ("eval-too-long", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/too_long.safetensors"], "40 tokens"),
    ("eval-flat", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/flat.safetensors"], "input_ids has shape (8,)"),
    ("eval-mask", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/mask_shape.safetensors"], "attention_mask has"),
    ("eval-labels", [*REPORT, "{r}/gpt2", "o", "--eval-inputs", "{r}/label_range.safetensors"], "-100 or 0..63"),
    ("eval-no-head", [*REPORT, "{r}/gpt2_base", "o", "--eval-inputs", "{r}/good.safetensors"], "GPT2Model has no"),
    ("eval-classes", [*REPORT, "{r}/bert", "o", "--eval-inputs", "{r}/bert_labels.safetensors"], "num_labels=3"),
    ("eval-class-shape", [*REPORT, "{r}/bert", "o", "--eval-inputs", "{r}/bert_label_shape.safetensors"], "(2,)"),
    ("eval-nan-pixels", [*REPORT, "{r}/vit", "o", "--eval-inputs", "{r}/vit_nan.safetensors"], "NaN"),
    ("eval-image-shape", [*REPORT, "{r}/vit", "o", "--eval-inputs", "{r}/vit_shape.safetensors"], "(2, 3, 16, 16)"),
    # -- train --------------------------------------------------------------------------------------------------
    ("train-set-routing", ["train", "vit_digits", "--variants", "comet", "--set", "routing=topk"], "routing='topk'"),
    ("train-variants-empty", ["train", "vit_digits", "--variants", ""], "--variants '' has an empty name"),
    ("train-variants-item", ["train", "vit_digits", "--variants", "comet,"], "--variants 'comet,'"),
    ("train-variant-unknown", ["train", "vit_digits", "--variants", "comet,hashed"], "'hashed'"),
    ("train-variant-twice", ["train", "vit_digits", "--variants", "comet,comet"], "names comet twice"),
    ("train-set-nan", ["train", "vit_digits", "--set", "router_aux_loss_coef=NaN"], "router_aux_loss_coef='NaN'"),
    ("train-set-inf-text", ["train", "vit_digits", "--set", "comet_keep_rate=inf"], "comet_keep_rate='inf'"),
    ("train-set-nan-list", ["train", "vit_digits", "--set", "moe_layers=[0, NaN]"], "not finite"),
    ("train-setting-nan", ["train", "vit_digits", "--setting", "learning_rate=NaN"], "learning_rate='NaN'"),
    ("train-set-provenance", ["train", "vit_digits", "--set", "converted_from=x"], "converted_from"),
    ("train-set-twice", ["train", "vit_digits", "--set", "num_experts=4", "--set", "num_experts=8"], "given twice"),
    ("train-steps-twice", ["train", "vit_digits", "--steps", "3", "--setting", "steps=4"], "both set steps"),
    (
        "train-unbuildable",
        ["train", "gpt2_text", "--fast", "--setting", "num_heads=3"],
        "the dense model cannot be built",
    ),
    ("train-seed", ["train", "vit_digits", "--seed", "-3"], "'-3' is outside the seed range"),
    ("train-out-file", ["train", "vit_digits", "--fast", "--output-dir", "{r}/a_file"], "'{r}/a_file' is a file"),
    ("train-out-parent-file", ["train", "vit_digits", "--output-dir", "{r}/a_file/run"], "'{r}/a_file' is a file"),
    ("train-out-entry", ["train", "vit_digits", "--output-dir", "{r}/run_with_file"], "holds a file 'comet'"),
    ("train-out-foreign", ["train", "vit_digits", "--output-dir", "{r}/run_foreign"], "run_foreign/comet' holds"),
    ("train-out-link", ["train", "vit_digits", "--output-dir", "{r}/run_link"], "'{r}/run_link' is a symlink"),
    ("train-out-here", ["train", "vit_digits", "--output-dir", ".", "--overwrite"], "'.' is the current folder"),
    ("train-out-above", ["train", "vit_digits", "--output-dir", "..", "--overwrite"], "holding the current one"),
    ("convert-dst-here", [*CONVERT, "{r}/gpt2", ".", "--overwrite"], "'.' is the current folder"),
    # -- train: TrainingArguments flags, per-variant overrides, telemetry level -----------------------------------
    ("train-logging-level", ["train", "vit_digits", "--routing-logging", "all"], "invalid choice: 'all'"),
    ("train-ta-unknown", ["train", "vit_digits", "--report-too", "wandb"], "unrecognized arguments: --report-too wandb"),
    ("train-ta-float", ["train", "vit_digits", "--learning_rate", "fast"], "invalid float value: 'fast'"),
    ("train-ta-accumulation", ["train", "vit_digits", "--gradient_accumulation_steps", "-1"], "--gradient_accumulation_steps -1 must be 1 or more"),
    ("train-ta-batch-zero", ["train", "vit_digits", "--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size 0 must be 1 or more"),
    ("train-ta-negative", ["train", "vit_digits", "--weight_decay", "-0.1"], "--weight_decay -0.1 is negative"),
    ("train-ta-negative-lr", ["train", "vit_digits", "--learning_rate", "-0.01"], "--learning_rate -0.01 is negative"),
    ("train-ta-nan", ["train", "vit_digits", "--weight_decay", "nan"], "--weight_decay nan is not finite"),
    ("train-ta-choice", ["train", "vit_digits", "--lr_scheduler_type", "annealing"], "invalid choice: 'annealing'"),
    ("train-ta-reporter", ["train", "vit_digits", "--report_to", "tensorbored"], "'tensorbored' is not a reporter"),
    ("train-ta-output-dir", ["train", "vit_digits", "--output_dir", "x"], "--output_dir is decided by the recipe"),
    ("train-ta-steps-twice", ["train", "vit_digits", "--steps", "3", "--max_steps", "5"], "--max_steps 5 and setting"),
    ("train-ta-lr-twice", ["train", "vit_digits", "--setting", "learning_rate=0.1", "--learning_rate", "0.2"], "both"),
    (
        "train-ta-combination",
        ["train", "vit_digits", "--fast", "--load_best_model_at_end"],
        "refused by TrainingArguments: --load_best_model_at_end requires the save and eval strategy to match",
    ),
    (
        "train-set-prefix-absent",
        ["train", "vit_digits", "--variants", "comet,topk", "--set", "switch.capacity_factor=1.25"],
        "the variants of this run are comet, topk",
    ),
    (
        "train-set-prefix-unknown",
        ["train", "vit_digits", "--variants", "switch", "--set", "swich.capacity_factor=1.25"],
        "'swich' is not a variant",
    ),
    (
        "train-set-read-by-none",
        ["train", "vit_digits", "--variants", "dense,comet", "--set", "capacity_factor=1.25"],
        "no variant of this run (dense, comet) reads capacity_factor; it is read by switch",
    ),
    (
        "train-set-dense",
        ["train", "vit_digits", "--variants", "dense,comet", "--set", "dense.hidden_dropout_prob=0.2"],
        "the dense variant is the upstream model",
    ),
    ("train-set-prefix-routing", ["train", "vit_digits", "--set", "comet.routing=topk"], "comet.routing='topk'"),
    (
        "train-set-prefix-field",
        ["train", "vit_digits", "--variants", "comet", "--set", "comet.keep_rate=0.5"],
        "'keep_rate' is not a comet_vit config field",
    ),
    (
        "train-set-prefix-value",
        ["train", "vit_digits", "--variants", "comet,switch", "--set", "switch.capacity_factor=-1"],
        "capacity_factor=-1 is not allowed",
    ),
    # -- demo ---------------------------------------------------------------------------------------------------
    ("demo-out-file", ["demo", "--fast", "--output-dir", "{r}/a_file"], "'{r}/a_file' is a file"),
    ("demo-out-empty", ["demo", "--fast", "--output-dir", ""], "--output-dir is empty"),
    ("demo-seed", ["demo", "--fast", "--seed", "1.5"], "'1.5' is not an integer seed"),
    # -- card ---------------------------------------------------------------------------------------------------
    ("card-missing", ["card", "{r}/nowhere"], "'{r}/nowhere' does not exist"),
    ("card-empty", ["card", ""], "checkpoint is empty"),
    ("card-file", ["card", "{r}/a_file"], "'{r}/a_file' is a file, not a folder"),
    ("card-no-config", ["card", "{r}/empty"], "has no config.json"),
    ("card-bad-json", ["card", "{r}/moe_nocard_badjson"], "is not valid JSON"),
    ("card-truncated", ["card", "{r}/moe_nocard_truncated"], "moe_nocard_truncated/model.safetensors' is not a"),
    ("card-garbage", ["card", "{r}/moe_nocard_garbage"], "moe_nocard_garbage/model.safetensors' is not a whole"),
    ("card-config-inf", ["card", "{r}/moe_inf"], "sets router_aux_loss_coef to a non-finite number"),
    ("card-no-weights", ["card", "{r}/moe_nocard_noweights"], "has no weights"),
    ("card-dense", ["card", "{r}/gpt2"], "is a gpt2 checkpoint, not an hf_comet one"),
    ("card-exists", ["card", "{r}/moe"], "pass --overwrite"),
    ("card-readme-dir", ["card", "{r}/moe_readme_dir", "--overwrite"], "README.md' is a folder"),
    ("card-missing-expert", ["card", "{r}/moe_missing_expert"], "experts.up_proj"),
    ("card-repo-id-space", ["card", "{r}/moe_nocard", "--repo-id", "me/my model"], "'me/my model' is not a Hub repo"),
    ("card-repo-id-deep", ["card", "{r}/moe_nocard", "--repo-id", "a/b/c"], "'a/b/c' is not a Hub repo id"),
]


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's refusals
        return exit_.code


def fill(items, root: Path) -> list[str]:
    return [item.replace("{r}", str(root)) for item in items]


@pytest.mark.parametrize("argv, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_bad_invocation_exits_2_naming_the_value_and_writes_nothing(root, argv, expected, capsys, monkeypatch):
    monkeypatch.chdir(root)  # relative paths (and train's default output folder) land in the watched folder

    def no_run(*args, **kwargs):
        raise AssertionError("a refused invocation started a training run")

    monkeypatch.setattr("hf_comet.training.recipes.base.run_prepared", no_run)  # fail fast instead of training
    before = snapshot(root)
    assert run_main(fill(argv, root)) == 2
    err = capsys.readouterr().err
    command = argv[0]
    assert f"hf-comet {command}: error: " in err, err
    assert fill([expected], root)[0] in err, err
    assert "Traceback" not in err
    assert snapshot(root) == before, "a refused invocation wrote or changed something"


def test_there_are_cases_for_every_subcommand_and_at_least_40():
    assert len(CASES) >= 40 and len({case[0] for case in CASES}) == len(CASES)
    assert {case[1][0] for case in CASES} == {"convert", "train", "demo", "card"}


def test_unreadable_and_unwritable_places_are_refused(root, capsys, monkeypatch):
    """Root ignores permission bits, so permissions are simulated where the checks ask for them (`os.access`)."""
    denied: dict[str, int] = {}  # path -> the access modes refused
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: not mode & denied.get(str(p), 0) and real_access(p, mode))
    before = snapshot(root)
    denied[str(root / "gpt2")] = os.R_OK
    assert run_main(["convert", str(root / "gpt2"), str(root / "out")]) == 2
    assert f"source '{root}/gpt2' cannot be read (permission denied)" in capsys.readouterr().err
    denied[str(root)] = os.W_OK
    assert run_main(["convert", str(root / "bert"), str(root / "out")]) == 2
    assert f"'{root}' is not writable" in capsys.readouterr().err
    denied[str(root / "good.safetensors")] = os.R_OK
    assert (
        run_main(["convert", str(root / "bert"), "o", "--report-only", "--eval-inputs", str(root / "good.safetensors")])
        == 2
    )
    assert "good.safetensors' cannot be read" in capsys.readouterr().err
    denied[str(root / "moe_nocard")] = os.W_OK  # README.md would go in a read-only folder
    assert run_main(["card", str(root / "moe_nocard")]) == 2
    assert f"'{root}/moe_nocard' is not writable" in capsys.readouterr().err
    assert snapshot(root) == before


def test_the_checks_let_good_invocations_through(root, tmp_path, capsys):
    """The same fixtures, used rightly, convert and report (the checks refuse mistakes, not valid uses)."""
    argv = ["convert", str(root / "gpt2"), str(tmp_path / "moe"), "--no-progress", "--report"]
    assert main([*argv, "--eval-inputs", str(root / "good.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "saved to" in out and "perplexity" in out
    assert main(["card", str(tmp_path / "moe"), "--overwrite", "--repo-id", "me/moe"]) == 0
    assert 'from_pretrained("me/moe")' in (tmp_path / "moe" / "README.md").read_text()


def test_an_unused_non_ffn_tensor_in_the_source_is_a_warning_not_an_error(root, tmp_path, capsys):
    _edit_weights(root / "gpt2", tmp_path / "extra", lambda s: s.update({"transformer.extra.weight": torch.zeros(3)}))
    assert main(["convert", str(tmp_path / "extra"), str(tmp_path / "moe"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "hf-comet convert: warning: " in err and "transformer.extra.weight" in err and "Traceback" not in err


def test_real_processes_print_no_traceback(root):
    """The installed entry point's path: ``python -m hf_comet.cli`` (the worktree's code), run concurrently."""
    picks = ["src-missing-ffn", "train-set-routing", "card-garbage"]  # each process imports torch: a few
    cases = {case[0]: case for case in CASES}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    before = snapshot(root)
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "hf_comet.cli", *fill(cases[name][1], root)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in picks
    }
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, (name, err[-2000:])
        assert "Traceback" not in err and "Traceback" not in out, (name, err[-2000:])
        command = cases[name][1][0]
        assert f"hf-comet {command}: error: " in err and fill([cases[name][2]], root)[0] in err, (name, err)
    assert snapshot(root) == before


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "hf-comet: error: the following arguments are required: command"),
        (["resize"], "invalid choice: 'resize'"),
        (["convert", "a"], "hf-comet convert: error: the following arguments are required: destination"),
        (["info", "--bogus"], "unrecognized arguments: --bogus"),
        (["convert", "a", "b", "--method", "moefy"], "invalid choice: 'moefy'"),
    ],
)
def test_argparse_refusals_are_one_line_with_a_pointer_to_help(argv, expected, capsys):
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "--help' " not in err and "(see 'hf-comet" in err and "usage:" not in err
