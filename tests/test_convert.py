"""Dense -> MoE conversion on checkpoints saved by the stock transformers classes: exactness where the maths allows
it (all families and heads), provenance, only the FFNs of the chosen blocks change, bad input refused."""

import json

import pytest
import torch
import transformers
from conftest import head_class, main_output, tiny_inputs

from hf_comet.convert import ConversionError, balanced_kmeans, convert_to_moe, deviation_report
from hf_comet.convert.core import stock_to_ours

STOCK_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, pad_token_id=0, num_labels=3,
    ),
    "vit": lambda: transformers.ViTConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128, image_size=8,
        patch_size=4, num_channels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    ),
    "bert": lambda: transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128, vocab_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    ),
}  # fmt: skip
STOCK_CLASSES = {
    "gpt2": [
        "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2ForTokenClassification",
        "GPT2ForQuestionAnswering", "GPT2DoubleHeadsModel",
    ],
    "vit": ["ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling"],
    "bert": [
        "BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
        "BertForPreTraining", "BertLMHeadModel", "BertForNextSentencePrediction", "BertForMultipleChoice",
        "BertForQuestionAnswering",
    ],
}  # fmt: skip
CLASS_CONFIG = {
    "ViTForMaskedImageModeling": dict(encoder_stride=4),
    "BertLMHeadModel": dict(is_decoder=True),
    "BertForQuestionAnswering": dict(num_labels=2),
}
CASES = [(family, name) for family, names in STOCK_CLASSES.items() for name in names]
EXACT = [
    ("comet", {"comet_keep_rate": 1.0}),
    ("upcycle", {"routing": "topk", "num_experts": 4, "num_experts_per_tok": 2}),
    ("upcycle", {"routing": "deep", "num_experts": 4}),
    ("split", {"num_experts": 4, "num_experts_per_tok": 4}),
    ("split", {"num_experts": 4, "num_experts_per_tok": 4, "split_method": "kmeans"}),
    ("split", {"num_experts": 4, "num_experts_per_tok": 4, "split_method": "random"}),
]


def inputs_for(family: str, class_name: str | None = None) -> dict:
    """Unlabelled inputs of the stock class ``class_name`` (the base model's when ``None``): conftest's tiny inputs
    of our head that converts it."""
    family_adapter, head = stock_to_ours()[class_name or STOCK_CLASSES[family][0]]
    return tiny_inputs(family_adapter.model_type, head, with_labels=False)


def saved_stock(family: str, class_name: str, path):
    torch.manual_seed(0)
    config = STOCK_CONFIGS[family]()
    for key, value in CLASS_CONFIG.get(class_name, {}).items():
        setattr(config, key, value)
    model = getattr(transformers, class_name)(config).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family, class_name", CASES)
@pytest.mark.parametrize(
    "method, fields", EXACT, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values()))
)
def test_conversion_reproduces_the_dense_model_where_the_maths_allows(family, class_name, method, fields, tmp_path):
    dense = saved_stock(family, class_name, tmp_path / "dense")
    fields = dict(fields)
    split_method = fields.pop("split_method", "contiguous" if method == "split" else None)
    moe = convert_to_moe(tmp_path / "dense", method, split_method=split_method, seed=3, **fields)
    inputs = inputs_for(family, class_name)
    with torch.no_grad():
        torch.testing.assert_close(main_output(moe(**inputs)), main_output(dense(**inputs)), rtol=0, atol=1e-5)
    assert moe.config.converted_from == "./dense"  # the folder name, never an absolute path
    assert moe.config.conversion_method == method and moe.config.conversion_seed == 3
    assert moe.config.split_method == split_method


@pytest.mark.parametrize("family, class_name", [c for c in CASES if c[1] not in ("GPT2Model", "ViTModel", "BertModel")])
def test_converted_checkpoint_loads_with_the_auto_classes_and_keeps_every_non_ffn_weight(family, class_name, tmp_path):
    dense = saved_stock(family, class_name, tmp_path / "dense")
    moe = convert_to_moe(dense, "upcycle", num_experts=4, moe_layers=[1])
    moe.save_pretrained(tmp_path / "moe")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["conversion_method"] == "upcycle" and config["moe_layers"] == [1]
    family_adapter, head = stock_to_ours()[class_name]
    loaded = head_class(family_adapter.model_type, head).from_pretrained(tmp_path / "moe").eval()  # Auto class
    assert type(loaded) is family_adapter.head_class(head)
    inputs = inputs_for(family, class_name)
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs)), main_output(dense(**inputs)), rtol=0, atol=1e-5)
    dense_state, moe_state = dense.state_dict(), loaded.state_dict()
    ffn_of_block_1 = {"gpt2": ".h.1.mlp.", "vit": "layers.1.mlp.", "bert": "layer.1.intermediate.dense"}[family]
    bert_out_1 = "layer.1.output.dense."
    for key, value in dense_state.items():
        if ffn_of_block_1 in key or bert_out_1 in key:
            assert key not in moe_state
            continue
        assert torch.equal(moe_state[key], value), key  # attention (incl. BERT attention.output.dense), heads, block 0


def test_split_partitions_are_balanced_permutations_and_seeded():
    points = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    order = balanced_kmeans(points, 4, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == list(range(64))
    again = balanced_kmeans(points, 4, torch.Generator().manual_seed(1))
    assert torch.equal(order, again)
    # clusters are tighter than a random partition of the same sizes
    spread = lambda idx: sum(points[idx[i * 16 : (i + 1) * 16]].var(0).sum() for i in range(4))  # noqa: E731
    assert spread(order) < spread(torch.randperm(64, generator=torch.Generator().manual_seed(2)))


def test_deviation_report_is_zero_only_where_the_conversion_is_exact(tmp_path):
    saved_stock("gpt2", "GPT2LMHeadModel", tmp_path / "dense")
    comet = deviation_report(tmp_path / "dense", "comet", [0.25, 1.0])
    assert comet[0]["max_abs_error"] > 1e-4 and comet[1]["max_abs_error"] < 1e-5
    split = deviation_report(tmp_path / "dense", "split", [1, 4], num_experts=4)
    assert split[0]["max_abs_error"] > 1e-4 and split[1]["max_abs_error"] < 1e-5
    assert 0.0 <= split[0]["argmax_agreement"] <= 1.0


@pytest.mark.parametrize("family, class_name", [("bert", "BertForMultipleChoice"), ("gpt2", "GPT2DoubleHeadsModel")])
def test_the_deviation_report_probes_multiple_choice_heads_with_choices(family, class_name, tmp_path):
    saved_stock(family, class_name, tmp_path / "dense")
    rows = deviation_report(tmp_path / "dense", "comet", [0.25, 1.0])
    assert rows[0]["max_abs_error"] > 1e-4 and rows[1]["max_abs_error"] < 1e-5


@pytest.mark.parametrize(
    "make, method, fields, message",
    [
        ("gpt2", "split", {"num_experts": 3}, "num_experts=3 does not divide"),
        ("gpt2", "comet", {"routing": "topk"}, "routing='comet'"),
        ("gpt2", "upcycle", {"routing": "comet"}, "learned routing"),
        ("gpt2", "fold", {}, "method='fold'"),
        ("gpt2", "upcycle", {"num_experts_per_tokk": 2}, "num_experts_per_tokk"),
        ("gpt2", "comet", {"comet_keep_rate": 0.0}, "comet_keep_rate"),
        ("gpt2", "upcycle", {"moe_intermediate_size": 32}, "moe_intermediate_size is set by method='upcycle'"),
        ("gpt2", "upcycle", {"split_method": "kmeans"}, "only applies to method='split'"),
        ("custom", "comet", {}, "BertForRanking has no hf_comet counterpart"),
        ("t5", "comet", {}, "supported sources"),
    ],
)
def test_bad_conversions_are_refused_with_a_clear_error(make, method, fields, message, tmp_path):
    if make == "custom":  # a user's own head on BERT: every transformers head has a counterpart, this one none
        transformers.BertModel(STOCK_CONFIGS["bert"]()).save_pretrained(tmp_path / "dense")
        config = json.loads((tmp_path / "dense" / "config.json").read_text())
        (tmp_path / "dense" / "config.json").write_text(json.dumps(config | {"architectures": ["BertForRanking"]}))
    elif make == "t5":
        config = transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32)
        transformers.T5Model(config).save_pretrained(tmp_path / "dense")
    else:
        saved_stock("gpt2", "GPT2LMHeadModel", tmp_path / "dense")
    with pytest.raises(ConversionError, match=message):
        convert_to_moe(tmp_path / "dense", method, **fields)


def test_cli_convert_writes_atomically_refuses_an_existing_destination_and_reports(tmp_path, capsys):
    from hf_comet.cli import main

    saved_stock("bert", "BertForSequenceClassification", tmp_path / "dense")
    destination = tmp_path / "moe"
    argv = ["convert", str(tmp_path / "dense"), str(destination), "--method", "split", "--num-experts", "4"]
    argv += ["--num-experts-per-tok", "4", "--split-method", "kmeans", "--moe-layers", "0,1", "--no-progress"]
    assert main([*argv, "--report"]) == 0
    out = capsys.readouterr().out
    assert "saved to" in out and "experts per token" in out
    model = transformers.AutoModelForSequenceClassification.from_pretrained(destination)
    assert model.config.split_method == "kmeans" and model.config.expert_output_bias == "shared"
    before = (destination / "model.safetensors").read_bytes()
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert (destination / "model.safetensors").read_bytes() == before
    for bad in (["--sweep", "8", "--report"], ["--eval-inputs", str(tmp_path / "missing.pt"), "--report"]):
        assert main([*argv, "--overwrite", *bad]) == 2  # the report fails before anything is written
        assert (destination / "model.safetensors").read_bytes() == before
    capsys.readouterr()
    assert main([*argv[:6], "3", "--no-progress", "--overwrite"]) == 2  # 3 experts do not divide 128
    assert "does not divide" in capsys.readouterr().err
    assert (destination / "model.safetensors").read_bytes() == before  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_deviation_report_adds_task_metrics_for_an_evaluation_set(tmp_path):
    from hf_comet.data import digits_images

    torch.manual_seed(0)
    config = STOCK_CONFIGS["vit"]()
    config.num_labels = 10
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "dense")
    _, test = digits_images()
    batch = {"pixel_values": test["pixel_values"][:64, :, :, :], "labels": test["labels"][:64]}
    rows = deviation_report(tmp_path / "dense", "comet", [0.25, 1.0], inputs=batch)
    dense, low, full = rows
    assert dense["setting"] == "dense" and {"eval_loss", "accuracy"} <= set(dense)
    assert full["eval_loss"] == pytest.approx(dense["eval_loss"], abs=1e-5) and full["accuracy"] == dense["accuracy"]
    assert low["eval_loss"] != pytest.approx(dense["eval_loss"], abs=1e-5)
    gpt2 = saved_stock("gpt2", "GPT2LMHeadModel", tmp_path / "gpt2")
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    rows = deviation_report(gpt2, "split", [4], inputs={"input_ids": ids, "labels": ids}, num_experts=4)
    assert rows[1]["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=1e-5)


def test_split_routers_choose_by_input_and_upcycled_routers_are_not_degenerate(tmp_path):
    dense = saved_stock("bert", "BertForMaskedLM", tmp_path / "dense")
    split = convert_to_moe(dense, "split", num_experts=4, num_experts_per_tok=2, split_method="kmeans")
    inputs = inputs_for("bert")
    with torch.no_grad():
        chosen = [
            {tuple(sorted(row)) for row in block.router(torch.randn(32, 32)).top_k_index.tolist()}
            for block in split.moe_blocks()
        ]
    assert all(len(pairs) > 1 for pairs in chosen)  # not the same two experts for every token
    upcycled = convert_to_moe(dense, "upcycle", routing="switch", num_experts=4, capacity_factor=1.25)
    upcycled.train()
    upcycled(**inputs, labels=inputs["input_ids"])
    for layer in upcycled.routing_statistics().values():
        assert layer["dropped_tokens"] < layer["tokens"] / 2  # a random, not an all-tied, router


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("bert.encoder.layer.1.intermediate.dense.weight"), "lacks 1 weight"),
        (lambda s: s.pop("bert.embeddings.word_embeddings.weight"), "bert.embeddings.word_embeddings.weight"),
        (lambda s: s.update({"bert.encoder.layer.2.output.dense.bias": torch.zeros(32)}), "FFN weights"),
        (lambda s: s.update({"bert.encoder.layer.0.intermediate.dense.bias": torch.zeros(7)}), r"\(7,\) \(needs"),
    ],
    ids=["missing-ffn", "missing-other", "unexpected-ffn", "wrong-shape"],
)
def test_a_source_whose_weights_do_not_fill_its_class_is_refused_not_made_random(edit, message, tmp_path):
    """The converter reads the dense model's load report itself: a missing or mis-shaped tensor, or an FFN tensor
    the class does not read, is an error (transformers would fill the gap with random values, silently here)."""
    from safetensors.torch import load_file, save_file

    saved_stock("bert", "BertForSequenceClassification", tmp_path / "dense")
    state = load_file(tmp_path / "dense" / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "dense" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=message):
        convert_to_moe(tmp_path / "dense", "upcycle", num_experts=4)
    with pytest.raises(ConversionError, match=message):
        deviation_report(tmp_path / "dense", "upcycle", [1], num_experts=4)


def test_an_unused_non_ffn_source_tensor_warns_and_converts(tmp_path):
    from safetensors.torch import load_file, save_file

    saved_stock("gpt2", "GPT2LMHeadModel", tmp_path / "dense")
    state = load_file(tmp_path / "dense" / "model.safetensors")
    state["transformer.unused.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "dense" / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="transformer.unused.weight"):
        convert_to_moe(tmp_path / "dense", "comet")
