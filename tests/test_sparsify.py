"""`hf_comet.convert.sparsify`: co-activation blocks and the fitted router (issue 20, quality that survives conversion).

Exactness at keep 1.0 after the unit permutation (every family), the fitted router against COMET's random one at
picking a token's most important blocks, the checkpoint round trip of the fitted router, and every refusal."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from hf_comet.convert import ConversionError, convert_to_moe, deviation, sparsify
from hf_comet.convert.sparse import block_importance, capture_ffn_inputs

VOCAB = 64


def _gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    fields = dict(n_embd=32, n_layer=2, n_head=2, n_inner=128, vocab_size=VOCAB, n_positions=32, bos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**fields, "eos_token_id": 0, **overrides})).eval()


def _bert() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=32,
    )  # fmt: skip
    return BertForMaskedLM(config).eval()


def _vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=3,
    )  # fmt: skip
    return ViTForImageClassification(config).eval()


def _tokens(seed: int, batch: int = 8, seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0  # padded tokens are left out of the calibration
    return {"input_ids": ids, "attention_mask": mask}


def _images(seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}


FAMILIES = {"gpt2": (_gpt2, _tokens), "bert": (_bert, _tokens), "vit": (_vit, _images)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_coactivation_blocks_are_a_permutation_exact_at_keep_one(family):
    build, inputs = FAMILIES[family]
    dense = build()
    plain = convert_to_moe(dense, "comet", comet_block_size=16, comet_keep_rate=1.0)
    model = sparsify(dense, 1.0, 16, [inputs(0), inputs(1)], cluster="coactivation", router="fitted")
    first = model.moe_blocks()[0].experts_module.up_proj
    assert not torch.equal(first, plain.moe_blocks()[0].experts_module.up_proj)  # the units were regrouped
    assert torch.equal(  # ... as a permutation of the same units
        first.reshape(-1, first.shape[-1]).sort(dim=0).values,
        plain.moe_blocks()[0].experts_module.up_proj.reshape(-1, first.shape[-1]).sort(dim=0).values,
    )
    probe = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(model(**probe)[0], dense(**probe)[0], rtol=0, atol=1e-5)
    row = deviation(dense, model, probe)
    assert row["max_abs_error"] < 1e-5 and row["argmax_agreement"] == 1.0
    assert (model.config.sparsify_cluster, model.config.comet_router) == ("coactivation", "fitted")
    assert (model.config.comet_block_size, model.config.comet_keep_rate) == (16, 1.0)


def _top_block_recall(dense, model, held: dict[str, torch.Tensor], keep: int) -> list[float]:
    """Per layer, the share of each held-out token's ``keep`` most important blocks (the L2 norm of their
    contribution to the FFN output) that its router keeps."""
    names = [name for name, module in model.named_modules() if module in model.moe_blocks()]
    inputs = capture_ffn_inputs(dense, model.family, [held], names)
    recalls = []
    for name in names:
        block = model.get_submodule(name)
        experts, x = block.experts_module, inputs[name]
        blocks, width, hidden = experts.up_proj.shape
        h = experts.act_fn(
            torch.nn.functional.linear(x, experts.up_proj.reshape(-1, hidden), experts.up_proj_bias.flatten())
        )
        importance = block_importance(h, experts.down_proj.permute(1, 0, 2).reshape(hidden, -1), blocks)
        best, picked = importance.topk(keep, dim=-1).indices, block.router(x).top_k_index
        recalls.append(float((best.unsqueeze(-1) == picked.unsqueeze(-2)).any(-1).float().mean()))
    return recalls


@pytest.mark.parametrize("cluster", ["none", "coactivation"])  # coactivation + fitted: the defaults
def test_the_fitted_router_picks_the_important_blocks_better_than_the_random_one(cluster):
    """COMET's random projection knows nothing of the FFN, so it finds a token's 2 most important of 8 blocks at
    chance (about 25 %); the fitted one was fitted to exactly that importance, on other tokens (after clustering,
    on the permuted units' blocks)."""
    dense = _gpt2(initializer_range=0.2)
    calibration, held = [_tokens(seed, batch=16, seq=32) for seed in (0, 1)], _tokens(7, batch=16, seq=32)
    random = sparsify(dense, 0.25, 16, calibration, cluster=cluster, router="random")
    fitted = sparsify(dense, 0.25, 16, calibration, cluster=cluster, router="fitted")
    random_recall, fitted_recall = (_top_block_recall(dense, m, held, keep=2) for m in (random, fitted))
    assert all(r < 0.35 for r in random_recall), random_recall
    assert all(f > r + 0.2 for f, r in zip(fitted_recall, random_recall, strict=True)), (fitted_recall, random_recall)
    assert deviation(dense, fitted, held)["relative_error"] < deviation(dense, random, held)["relative_error"]


def test_the_fitted_router_round_trips_through_save_pretrained(tmp_path):
    dense = _gpt2()
    model = sparsify(dense, 0.5, 32, _tokens(0), seed=3)
    router = model.moe_blocks()[0].router
    assert router.fitted and router.projection_bias.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # init_weights must leave the loaded values alone
    for saved, back in zip(model.moe_blocks(), loaded.moe_blocks(), strict=True):
        assert torch.equal(saved.router.projection, back.router.projection)
        assert torch.equal(saved.router.projection_bias, back.router.projection_bias)
    probe = _tokens(5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**probe).logits, model(**probe).logits, rtol=0, atol=0)
    assert (loaded.config.comet_router, loaded.config.sparsify_cluster, loaded.config.conversion_seed) == (
        "fitted",
        "coactivation",
        3,
    )
    fresh = AutoModelForCausalLM.from_config(loaded.config)  # a fresh fitted router starts as the random one
    assert torch.equal(fresh.moe_blocks()[0].router.projection_bias, torch.zeros(4))


def test_without_calibration_it_is_plain_block_comet():
    dense = _gpt2()
    model = sparsify(dense, 0.5, 16, None, cluster="none", router="random")
    plain = convert_to_moe(dense, "comet", comet_block_size=16, comet_keep_rate=0.5)
    for a, b in zip(model.state_dict().items(), plain.state_dict().items(), strict=True):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert (model.config.comet_router, model.config.sparsify_cluster) == ("full", "none")


ERRORS = [
    (dict(keep_rate=0.01), r"keep_rate=0\.01 keeps floor\(0\.01 x 8 blocks\) = 0 blocks.*1/8 = 0\.125"),
    (dict(keep_rate=0), r"keep_rate=0 must be a number in \(0, 1\]"),
    (dict(keep_rate=1.5), r"keep_rate=1\.5 must be a number in \(0, 1\]"),
    (dict(keep_rate=True), r"keep_rate=True must be a number"),
    (dict(block_size=48), r"block_size=48 does not divide the FFN width 128.*e\.g\. 2, 4, 8, 16, 32, 64"),
    (dict(block_size=1), r"block_size=1 must be an integer from 2 to the FFN width 128"),
    (dict(calibration=None), r"calibration=None.*only cluster='none', router='random' needs none"),
    (dict(calibration=[]), r"calibration is empty.*only cluster='none', router='random' needs none"),
    (dict(calibration=iter([])), r"calibration is empty"),
    (dict(calibration={"attention_mask": torch.ones(2, 4)}), r"no 'input_ids' tensor"),
    (dict(calibration={"input_ids": torch.zeros(0, 4, dtype=torch.long)}), r"'input_ids' is empty"),
    (dict(calibration=torch.zeros(2, 4, dtype=torch.long)), r"calibration must be a dict of model inputs"),
    (dict(calibration={"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4)}),
     r"calibration has no real token: every attention_mask is 0"),
    (dict(cluster="kmeans"), r"cluster='kmeans' is not a clustering; choose one of none, coactivation"),
    (dict(router="learned"), r"router='learned' is not a sparsify router; choose one of random, fitted"),
    (dict(comet_router="structured"), r"comet_router='structured' is set by sparsify; use its argument router"),
    (dict(comet_block_size=8), r"comet_block_size=8 is set by sparsify; use its argument block_size"),
]


@pytest.mark.parametrize("kwargs, message", ERRORS, ids=[str(sorted(k)) + str(list(k.values())) for k, _ in ERRORS])
def test_bad_input_is_refused_before_any_work(kwargs, message, tmp_path):
    dense = _gpt2()
    dense.config.save_pretrained(tmp_path)  # a folder with a config and no weights: any loading would fail
    call = {**dict(keep_rate=0.5, block_size=16, calibration=_tokens(0)), **kwargs}
    with pytest.raises(ConversionError, match=message):
        sparsify(tmp_path, **call)


def test_a_model_without_a_sparsifiable_ffn_is_refused():
    opt = OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                   vocab_size=VOCAB, word_embed_proj_dim=16))  # fmt: skip
    with pytest.raises(ConversionError, match=r"model_type='opt' has no FFN sparsify.*gpt2, vit, bert"):
        sparsify(opt, 0.5, 16, _tokens(0))
    converted = convert_to_moe(_gpt2(), "comet", comet_block_size=16)
    with pytest.raises(ConversionError, match=r"already an hf_comet model \(model_type='comet_gpt2'\).*dense gpt2"):
        sparsify(converted, 0.5, 16, _tokens(0))


def test_the_package_name_is_the_function_whatever_is_imported_first():
    """The function lives in ``hf_comet.convert.sparse``: importing that module first never shadows the package's
    ``sparsify`` (a module named like its function would). Fresh interpreter: the order matters."""
    code = (
        "import hf_comet.convert.sparse\n"
        "from hf_comet.convert import ConversionError, sparsify\n"
        "try:\n"
        "    sparsify(None, 0.5, 16, None, cluster='bad')\n"
        "except ConversionError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "cluster='bad' is not a clustering" in result.stdout


# -- hf-comet sparsify ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_gpt2(tmp_path):
    """A saved stock GPT-2 and a calibration file of 8 rows (every 4th is held out for the deviation)."""
    from safetensors.torch import save_file

    source = tmp_path / "gpt2"
    _gpt2().save_pretrained(source)
    calibration = tmp_path / "calibration.safetensors"
    save_file(_tokens(0), str(calibration))
    return source, calibration


def test_the_command_sparsifies_saves_and_prints_deviation_and_speedup(saved_gpt2, tmp_path, capsys):
    from hf_comet import cli

    source, calibration = saved_gpt2
    argv = ["sparsify", str(source), str(tmp_path / "out"), "--keep-rate", "0.25", "--block-size", "16",
            "--calibration", str(calibration), "--rounds", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "blocks of 16 units that fire together, keep 0.25, fitted router" in out
    assert "deviation from the source before fine-tuning (held-out calibration rows): relative output error" in out
    assert "speedup over the source on this machine, forward:" in out and "decode, batch 1:" in out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    rows = _tokens(0)
    fit = {k: v[torch.arange(8) % 4 != 3] for k, v in rows.items()}  # the rows the command fitted on
    expected = sparsify(_gpt2(), 0.25, 16, fit)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**rows).logits, expected(**rows).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--keep-rate", "0.01", "--block-size", "16", "--calibration", "{c}"], "smallest keep rate with 8 blocks"),
        (["--keep-rate", "0.5", "--block-size", "48", "--calibration", "{c}"], "does not divide the FFN width 128"),
        (["--keep-rate", "0.5"], "give --calibration FILE"),
        (["--keep-rate", "0.5", "--calibration", "{c}", "--rounds", "-1"], "rounds=-1 must be 0"),
        (["--keep-rate", "1.5", "--cluster", "none", "--router", "random"], "keep_rate=1.5 must be a number in (0, 1]"),
        (["--keep-rate", "0.5", "--calibration", "{s}/config.json"], "is not a safetensors file"),
    ],
)
def test_the_command_refuses_bad_input_before_writing(saved_gpt2, tmp_path, capsys, flags, message):
    from hf_comet import cli

    source, calibration = saved_gpt2
    flags = [f.format(c=calibration, s=source) for f in flags]
    assert cli.main(["sparsify", str(source), str(tmp_path / "new" / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # refused before any folder (or lock file) was made


def test_without_calibration_the_plain_blocks_and_random_router_need_none(saved_gpt2, tmp_path, capsys):
    from hf_comet import cli

    source, _ = saved_gpt2
    argv = ["sparsify", str(source), str(tmp_path / "out"), "--keep-rate", "0.5", "--cluster", "none", "--router",
            "random", "--rounds", "0"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "blocks of 16 consecutive units, keep 0.5, COMET's random router" in out
    assert "deviation from the source before fine-tuning (seeded random inputs): relative output error" in out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (loaded.config.comet_router, loaded.config.comet_block_size) == ("full", 16)  # default block: F / 8


@pytest.mark.parametrize(("padded_rows", "part"), [((0, 1, 2, 4, 5, 6), "fit"), ((3, 7), "held-out")])
def test_the_command_refuses_calibration_rows_of_padding_only(saved_gpt2, tmp_path, capsys, padded_rows, part):
    from safetensors.torch import save_file

    from hf_comet import cli

    source, _ = saved_gpt2
    rows = _tokens(0)
    rows["attention_mask"] = torch.ones_like(rows["input_ids"])
    rows["attention_mask"][list(padded_rows)] = 0  # rows 3 and 7 are the held-out ones
    padded = tmp_path / "padded.safetensors"
    save_file(rows, str(padded))
    argv = ["sparsify", str(source), str(tmp_path / "new" / "out"), "--keep-rate", "0.5", "--calibration", str(padded)]
    assert cli.main(argv) == 2
    assert f"marks no real token in the {part} rows" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
