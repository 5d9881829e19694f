"""``hf-comet reproduce`` (issue 14): the quick pipeline end to end, the resumable cache, the statistics against
scipy/numpy references, and the MLP variants' defining properties. The verdict rule and the committed page's
regeneration are tested in test_reproduce_verdicts.py."""

import json

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from hf_comet import cli
from hf_comet.reproduce import (
    CLAIMS,
    RunCache,
    code_version,
    finetune,
    merging,
    mlp,
    models,
    reproduce,
    time_to_quality,
    transformer_claims,
)
from hf_comet.reproduce.stats import area_under_curve, holm, mean_interval, paired_test, steps_to_reach


def test_the_quick_run_writes_every_claim_s_section_and_plot_and_reruns_reuse_every_finished_run(
    quick_reproduction, monkeypatch
):
    tmp_path, results = quick_reproduction
    monkeypatch.chdir(tmp_path)  # the quick page lives under the cache, never in docs/
    assert not (tmp_path / "docs").exists()
    page = tmp_path / "cache" / "quick" / "results.md"
    assert [r.name for r in results] == list(CLAIMS)
    text = page.read_text()
    assert "Quick mode" in text and "not run yet" not in text
    for name, claim in CLAIMS.items():
        assert claim.title in text and f"hf-comet reproduce {name}" in text
        assert (page.parent / "results" / f"{name}_curves.png").stat().st_size > 0
    for name in ("comet_mlp", "comet_regression", "convert_finetune", "expert_merging", "comet_transformers_vit",
                 "comet_transformers_gpt2"):
        assert (tmp_path / "cache" / "quick" / f"{name}.jsonl").read_text().count("\n") >= 4  # runs, not one record
    assert (tmp_path / "cache" / "quick" / "time_to_quality.jsonl").read_text().count("\n") == 2  # one benchmark each
    assert not list((tmp_path / "cache" / "quick" / "checkpoints").glob("ft-*"))  # fine-tune scratch removed
    finetuned = RunCache(tmp_path / "cache" / "quick", "convert_finetune", code_version(finetune)).records
    first = {(r["variant"], r["seed"]): r["curve"][0] for r in (e["spec"] | e["record"] for e in map(
        json.loads, (tmp_path / "cache" / "quick" / "convert_finetune.jsonl").read_text().splitlines()))}  # fmt: skip
    assert len(finetuned) == len(first)
    for seed in (0, 1):  # the schedule starts as exactly the dense model; plain COMET does not
        assert first[("comet_schedule", seed)] == pytest.approx(first[("dense", seed)], abs=1e-6)
        assert abs(first[("comet", seed)] - first[("dense", seed)]) > 1e-4
    words = ("**reproduced**", "**partly reproduced**", "**not reproduced**", "**contradicted**", "**met**",
             "**not met**", "**inconclusive**")  # fmt: skip (the verdict rule's words, stats.VERDICT_RULE)
    assert all(any(word in r.verdict for word in words) for r in results)

    def no_more_training(*args, **kwargs):
        raise AssertionError("a cached run was run again")

    monkeypatch.setattr(mlp, "train_one", no_more_training)
    monkeypatch.setattr(finetune, "finetune_one", no_more_training)
    monkeypatch.setattr(merging, "train_sequence", no_more_training)
    monkeypatch.setattr(models, "train_one", no_more_training)
    monkeypatch.setattr(time_to_quality, "step_times", no_more_training)
    again = reproduce(["comet_regression"], quick=True, cache_dir="cache")  # one claim: the others stay on the page
    assert [r.name for r in again] == ["comet_regression"] and again[0].verdict == results[list(CLAIMS).index("comet_regression")].verdict
    assert all(f"## {claim.title}" in page.read_text() for claim in CLAIMS.values())
    # a claim whose runs are not all cached is listed with its command, not rendered
    monkeypatch.undo()  # training allowed again (and the working folder restored: absolute paths below)
    alone = reproduce(["comet_regression"], quick=True, cache_dir=tmp_path / "other")  # a cache of one claim
    listed = (tmp_path / "other" / "quick" / "results.md").read_text()
    assert [r.name for r in alone] == ["comet_regression"]
    assert all(f"not run yet (`hf-comet reproduce {name}`)" in listed for name in CLAIMS if name != "comet_regression")


def test_the_cache_survives_a_half_written_line_and_ignores_runs_of_other_code(tmp_path):
    cache = RunCache(tmp_path, "claim", code="v1")
    spec = {"variant": "comet", "seed": 0}
    cache.put(spec, {"test": 0.5})
    with open(cache.path, "a") as handle:
        handle.write('{"key": "abc", "rec')  # killed mid-write
    reread = RunCache(tmp_path, "claim", code="v1")
    assert reread.get(spec) == {"test": 0.5}
    assert reread.get({"variant": "comet", "seed": 1}) is None
    reread.put({"variant": "comet", "seed": 1}, {"test": 0.75})  # the next record after the torn line stays readable
    assert RunCache(tmp_path, "claim", code="v1").get({"variant": "comet", "seed": 1}) == {"test": 0.75}
    assert json.loads(cache.path.read_text().splitlines()[0])["spec"] == spec
    assert RunCache(tmp_path, "claim", code="v2").get(spec) is None  # made by other code: runs again
    with open(cache.path, "a") as handle:  # lines that parse but are no record of ours are skipped, not a crash
        handle.write('null\n[1, 2]\n{"key": 3, "record": {}}\n{"code": "v1"}\n')
    assert RunCache(tmp_path, "claim", code="v1").get(spec) == {"test": 0.5}


def test_intervals_tests_and_curve_summaries_match_references():
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    half = scipy_stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    a, b = [0.9, 0.8, 0.85, 0.95], [0.7, 0.75, 0.8, 0.7]
    diff, p = paired_test(a, b)
    assert diff == pytest.approx(np.mean(np.subtract(a, b)))
    assert p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    assert paired_test([1.0, 1.0], [1.0, 1.0]) == (0.0, 1.0)
    # a difference that is float noise is no difference, whichever seed carries it
    assert paired_test([0.5 + 1e-15, 0.5, 0.5], [0.5] * 3)[1] == paired_test([0.5, 0.5, 0.5 + 1e-15], [0.5] * 3)[1] == 1
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, float("nan")])[0] == 0.2
    assert area_under_curve([0, 10, 20], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert steps_to_reach([10, 20, 30], [0.5, 0.8, 0.9], 0.8) == 20
    assert steps_to_reach([10, 20], [0.5, 0.6], 0.8) is None
    assert steps_to_reach([10, 20], [2.0, 1.0], 1.5, higher_is_better=False) == 20


def test_the_mlp_variants_are_what_the_paper_s_code_defines():
    x = torch.randn(16, 64)
    torch.manual_seed(0)
    dense = mlp.build("dense", 64, 32, 10, 1.0)
    torch.manual_seed(0)
    comet_all = mlp.build("comet", 64, 32, 10, 1.0)  # keep 1.0: every unit, the dense model itself
    torch.testing.assert_close(comet_all(x)[0], dense(x)[0])
    comet = mlp.build("comet", 64, 32, 10, 0.25)
    masks = comet.masks(x)
    assert all(torch.equal(m.sum(-1), torch.full((16,), 8.0)) for m in masks)  # exactly floor(0.25 * 32) units
    assert not any(p.requires_grad for p in comet.router.parameters())
    assert mlp.build("smaller", 64, 32, 10, 0.25).layers[0].out_features == 8
    top1 = mlp.build("random_top1", 64, 32, 10, 0.25)
    assert top1.num_experts == 4 and top1.experts[0].layers[0].out_features == 8 and not top1.gate.weight.requires_grad
    top2 = mlp.build("learned_top2", 64, 32, 10, 0.5)
    assert top2.num_experts == 4 and top2.experts[0].layers[0].out_features == 8  # 2 x 8 = 16 active units
    out, balance = top2(x)
    assert out.shape == (16, 10) and balance.requires_grad
    blocks = mlp.build("block_comet", 64, 32, 10, 0.5)
    assert blocks.block_size == 16 and blocks.k == 1


def test_top_k_keeps_the_k_largest_of_the_backbone_s_own_activations():
    torch.manual_seed(0)
    model = mlp.build("top_k", 64, 32, 10, 0.25)
    x = torch.randn(16, 64)
    assert model.k == 8 and not any(True for _ in model.buffers())  # no router, nothing extra
    h = torch.nn.functional.softplus(model.layers[0](x))
    kept = []
    model.layers[1].register_forward_pre_hook(lambda module, args: kept.append(args[0]))
    model(x)
    masked = kept[0]
    assert torch.equal((masked != 0).sum(-1), torch.full((16,), 8))  # exactly k units per row
    threshold = h.topk(8, dim=-1).values[:, -1:]
    torch.testing.assert_close(masked, h * (h >= threshold))  # the largest activations, unscaled
    model(x)[0].sum().backward()
    assert model.layers[0].weight.grad.abs().sum() > 0  # the routing follows the trained weights


def test_layer_wise_routes_on_a_frozen_projection_of_the_backbone_s_previous_layer():
    torch.manual_seed(0)
    model = mlp.build("layer_wise", 64, 32, 10, 0.5)
    torch.manual_seed(0)
    comet = mlp.build("comet", 64, 32, 10, 0.5)
    assert not any(p.requires_grad for p in model.router.parameters())
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(model.router, comet.router, strict=True))  # same V
    x = torch.randn(16, 64)
    inputs = []
    for layer in [*model.layers, model.output]:
        layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    before = [p.detach().clone() for p in model.router.parameters()]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x)[0].sum().backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.router.parameters(), strict=True))  # never learns
    for layer in range(3):  # layer l's kept units: the top-k of V_l on the layer's input (the backbone's output)
        expected = mlp.top_k_mask(model.router[layer](inputs[layer]), model.k)
        assert torch.equal(inputs[layer + 1] != 0, expected.bool())
    assert torch.equal(inputs[1] != 0, comet.masks(x)[0].bool())  # layer 1 reads the input, as COMET's does
    # deeper layers differ from COMET, whose chain reads its own masked state instead of the backbone's
    assert not torch.equal(comet.masks(x)[1].bool(), inputs[2] != 0)


def test_example_tied_dropout_fixes_a_mask_per_example_and_evaluates_on_the_generalisation_units():
    torch.manual_seed(0)
    model = mlp.build("example_tied_dropout", 64, 40, 10, 0.5, num_examples=30)
    assert model.generalisation_units == 20 and model.example_masks.shape == (3, 30, 40)
    assert torch.all(model.example_masks[:, :, :20] == 1)
    tail = model.example_masks[:, :, 20:]
    assert 0.1 < tail.mean() < 0.3 and not torch.equal(model.example_masks[0, 0], model.example_masks[0, 1])
    x = torch.randn(4, 64)
    index = torch.tensor([3, 7, 3, 11])
    first, second = model(x, example_index=index)[0], model(x, example_index=index)[0]
    torch.testing.assert_close(first, second)  # deterministic: the same example gets the same mask every time
    other = model(x, example_index=torch.tensor([4, 8, 5, 12]))[0]
    assert not torch.allclose(first, other)
    seen = []
    model.layers[1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(x, example_index=index)
    assert torch.equal(seen[-1] != 0, model.example_masks[0, index].bool())
    model.eval()
    model(x)
    assert torch.equal((seen[-1] != 0).sum(-1), torch.full((4,), 20)) and torch.all(seen[-1][:, 20:] == 0)
    model.train()
    with pytest.raises(ValueError, match="example_index"):
        model(x)
    with pytest.raises(ValueError, match="num_examples=None"):
        mlp.build("example_tied_dropout", 64, 40, 10, 0.5)
    record = mlp.train_one("example_tied_dropout", "digits", 16, 0.5, 0, steps=3, learning_rate=1e-3, eval_every=3)
    assert 0.0 <= record["train"] <= 1.0 and 0.0 <= record["test"] <= 1.0  # the final train metric is recorded


def test_every_mlp_variant_is_tuned_on_its_own_and_the_page_shows_the_gap(tmp_path):
    from hf_comet.reproduce.comet_mlp import MLP_QUICK, SINGLE_KEEP_VARIANTS, MLPSettings, mlp_claim

    assert set(SINGLE_KEEP_VARIANTS) & set(MLP_QUICK.variants)
    settings = MLPSettings(widths=(16,), keep_rates=(0.25, 0.5), seeds=(0, 1), steps=4, eval_every=2,
                           learning_rates=(1e-3, 3e-2), tune_width=16,
                           variants=("dense", "comet", "top_k", "example_tied_dropout"))  # fmt: skip
    assert settings.keeps("dense") == (1.0,) and settings.keeps("top_k") == (0.5,)
    result = mlp_claim("comet_mlp", "digits", settings, tmp_path / "cache", tmp_path / "plots", quick=True)
    lines = (tmp_path / "cache" / "comet_mlp.jsonl").read_text().splitlines()
    runs = [json.loads(line) for line in lines]
    assert all("train" in r["record"] for r in runs)
    tuning = [r["spec"] for r in runs if r["spec"]["seed"] == 0 and r["spec"]["width"] == 16]
    for variant in settings.variants:
        assert {s["learning_rate"] for s in tuning if s["variant"] == variant} == {1e-3, 3e-2}
        assert f"{variant}: 0.001 →" in result.markdown
    assert not [r for r in runs if r["spec"]["variant"] == "top_k" and r["spec"]["keep_rate"] == 0.25]
    assert "gap (train − test)" in result.markdown and "| —" in result.markdown  # top_k did not run at keep 0.25


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_the_transformer_variants_are_the_baselines_the_claim_names(family):
    settings = transformer_claims.QUICK[family]
    ffn = 4 * settings.hidden_size
    dense = models.build(settings, "dense", 1.0, seed=0)
    assert type(dense).__module__.startswith("transformers.models")  # the stock model, not ours
    smaller = models.build(settings, "smaller", 0.25, seed=0)
    assert smaller.config.to_dict()["n_inner" if family == "gpt2" else "intermediate_size"] == ffn // 4
    dropout = models.build(settings, "dropout", 0.25, seed=0)
    assert [m.p for m in dropout.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0] == [0.75] * settings.layers
    comet = models.build(settings, "comet", 0.25, seed=0)
    assert (comet.config.routing, comet.config.comet_keep_rate, comet.config.comet_block_size) == ("comet", 0.25, 1)
    assert models.build(settings, "block_comet", 0.25, seed=0).config.comet_block_size == 16
    random = models.build(settings, "random_top1", 0.25, seed=0)
    assert (random.config.num_experts, random.config.num_experts_per_tok, random.config.moe_intermediate_size) == (4, 1, ffn // 4)
    frozen = [n for n, p in random.named_parameters() if not p.requires_grad]
    assert frozen and all(".router." in n for n in frozen) and len(frozen) == settings.layers  # only the gate is fixed
    learned = models.build(settings, "learned_top1", 0.25, seed=0)
    assert learned.config.routing == "switch" and all(p.requires_grad for p in learned.parameters())
    top2 = models.build(settings, "learned_top2", 0.25, seed=0)
    assert (top2.config.num_experts, top2.config.num_experts_per_tok, top2.config.moe_intermediate_size) == (8, 2, ffn // 8)
    # the seed decides the initial weights and COMET's projection: runs pair by seed, and seeds differ
    first = next(iter(dense.state_dict()))
    assert torch.equal(models.build(settings, "dense", 1.0, seed=3).state_dict()[first],
                       models.build(settings, "dense", 1.0, seed=3).state_dict()[first])  # fmt: skip
    assert not torch.equal(models.build(settings, "dense", 1.0, seed=4).state_dict()[first],
                           models.build(settings, "dense", 1.0, seed=3).state_dict()[first])  # fmt: skip
    assert models.build(settings, "comet", 0.5, seed=4).config.routing_seed == 4
    with pytest.raises(ValueError, match="variant='wide'"):
        models.build(settings, "wide", 0.5, seed=0)


def test_the_cli_refuses_an_unknown_claim_before_any_run(tmp_path, capsys):
    assert cli.main(["reproduce", "comet_vit_magic", "--quick", "--cache", str(tmp_path), "--page",
                     str(tmp_path / "r.md")]) == 2  # fmt: skip
    assert "unknown claim(s) 'comet_vit_magic'" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_the_cli_refuses_a_cache_that_is_a_file_before_any_run(tmp_path, capsys):
    (tmp_path / "cache").write_text("not a folder")
    assert cli.main(["reproduce", "comet_regression", "--quick", "--cache", str(tmp_path / "cache")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "cache").read_text() == "not a folder"  # nothing written over it



def test_the_sparsify_claim_judges_the_interval_against_the_margin():
    from hf_comet.reproduce.stats import margin_verdict as verdict_of

    assert verdict_of(-0.8, 0.5, 1.0) == "met"  # the whole interval above minus the margin
    assert verdict_of(-3.0, -1.2, 1.0) == "not met"  # the whole interval under it
    assert verdict_of(-1.5, 0.2, 1.0) == "inconclusive"  # it straddles the margin
    assert verdict_of(float("nan"), float("nan"), 1.0) == "inconclusive"  # one seed: no interval
