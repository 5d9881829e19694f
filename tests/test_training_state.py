"""Training state that survives: resume is bit-identical for every routing and option, a non-finite decision never
enters running state, counters are exact beyond 2^24 tokens, and concurrent forwards lose no statistics."""

import json
import threading

import pytest
import torch
from conftest import ROUTING_NAMES, tiny_inputs, tiny_model
from test_training import ListDataset, args, rows_of

from hf_comet.modeling.moe_routers import ROUTER_CLASSES
from hf_comet.training import CometTrainer, DeepConstraintCallback, ExpertMergingCallback

VIT = ("comet_vit", "AutoModelForImageClassification")
CASES = {name: (dict(routing=name), None) for name in ROUTING_NAMES}
CASES["topk_similarity"] = (dict(routing="topk", similarity_beta_s=1.0, similarity_beta_d=0.1), None)
CASES["switch_capacity"] = (dict(routing="switch", capacity_factor=1.0), None)
CASES["deep_callback"] = (dict(routing="deep", deep_constraint_steps=3), lambda: DeepConstraintCallback())
CASES["topk_merging"] = (dict(routing="topk"), lambda: ExpertMergingCallback(every_n_steps=2))


def _train(tmp_path, fields, callback, resume: bool):
    router_class = ROUTER_CLASSES["comet" if fields["routing"] == "block_comet" else fields["routing"]]
    if "router_aux_loss_coef" in router_class.config_fields:  # a strong aux loss where the routing has one
        fields = dict(fields, router_aux_loss_coef=1.0)
    model = tiny_model(*VIT, **fields)
    trainer = CometTrainer(
        model=model,
        args=args(
            tmp_path,
            max_steps=4,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=2,
            learning_rate=0.05,
            optim="adamw_torch",
        ),
        train_dataset=ListDataset(rows_of("comet_vit", 16)),
        callbacks=[callback()] if callback else None,
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2") if resume else None)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_resuming_from_a_checkpoint_continues_bit_for_bit(case, tmp_path):
    fields, callback = CASES[case]
    straight = _train(tmp_path, fields, callback, resume=False)
    resumed = _train(tmp_path, fields, callback, resume=True)  # loads checkpoint-2 written by the straight run
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(straight.moe_blocks(), resumed.moe_blocks(), strict=True):
        assert a.pair_draws == b.pair_draws and torch.equal(a.selection_counts, b.selection_counts)


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_a_non_finite_decision_enters_no_running_state_and_is_counted(routing):
    model = tiny_model(*VIT, routing=routing).train()
    inputs = tiny_inputs(*VIT, batch=4)
    model(**inputs)  # one clean forward
    blocks = model.moe_blocks()
    before = [
        (dict(b.statistics_tensors()), b.selection_counts.clone(), dict(b.router.named_buffers())) for b in blocks
    ]
    before = [({k: v.clone() for k, v in s.items()}, c, {k: v.clone() for k, v in buf.items()}) for s, c, buf in before]
    poisoned = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    poisoned["pixel_values"][1, 0, 0, 0] = float("nan")  # one bad sample
    model(**poisoned)
    for block, (stats, counts, buffers) in zip(blocks, before, strict=True):
        now = block.statistics_tensors()
        assert now["non_finite_decisions"] == stats["non_finite_decisions"] + 1
        for name, value in stats.items():
            if name != "non_finite_decisions":
                assert torch.equal(now[name], value), name
        assert torch.equal(block.selection_counts, counts)
        for name, value in buffers.items():
            assert torch.equal(dict(block.router.named_buffers())[name], value), name
    out = model(**inputs)  # later clean forwards are unharmed
    assert torch.isfinite(out.loss)
    assert model.routing_statistics()[blocks[0].layer_idx]["non_finite_decisions"] == 1


def test_counters_are_exact_beyond_two_to_the_24_tokens():
    model = tiny_model(*VIT, routing="topk").train()
    block = model.moe_blocks()[0]
    stats = block.statistics_tensors()
    assert stats["tokens"].dtype == stats["selections"].dtype == block.selection_counts.dtype == torch.int64
    assert stats["entropy_sum"].dtype == stats["gate_sum"].dtype == torch.float64
    stats["tokens"].fill_(2**25)
    block.selection_counts.fill_(2**25)
    inputs = tiny_inputs(*VIT, batch=3)
    model(**inputs)  # 3 images x 5 tokens; float32 would round 2^25 + 15 to a multiple of 4
    assert int(stats["tokens"]) == 2**25 + 15
    assert int(block.selection_counts.sum()) == 4 * 2**25 + 15 * 2  # top-2


def test_concurrent_forwards_from_threads_lose_no_statistics():
    model = tiny_model(*VIT, routing="topk").eval()
    inputs = tiny_inputs(*VIT, batch=2)
    model.reset_routing_statistics()
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        with torch.no_grad():
            for _ in range(10):
                model(**inputs)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for stats in model.routing_statistics().values():
        assert stats["tokens"] == 4 * 10 * 2 * 5
        assert sum(stats["tokens_per_expert"]) == 4 * 10 * 2 * 5 * 2


def _edited(edit):
    """A damage that parses the saved state, edits it, and writes it back as JSON."""

    def damage(text):
        state = json.loads(text)
        edit(state)
        return json.dumps(state)

    return damage


def _first(state):
    return state[next(iter(state))]


DAMAGED_STATES = [
    ("truncated", lambda text: text[: len(text) // 2], "JSONDecodeError"),
    ("empty-file", lambda text: "", "JSONDecodeError"),
    ("not-an-object", lambda text: "[1, 2, 3]", "not an object"),
    ("negative-draws", _edited(lambda s: _first(s).update(pair_draws=-3)), "pair_draws=-3"),
    ("float-draws", _edited(lambda s: _first(s).update(pair_draws=1.5)), "pair_draws=1.5"),
    ("short-counts", _edited(lambda s: _first(s)["selection_counts"].pop()), "selection_counts must be"),
    ("negative-counts", _edited(lambda s: _first(s).update(selection_counts=[-1] * 4)), "selection_counts must be"),
    ("missing-key", _edited(lambda s: _first(s).pop("pair_draws")), "expected pair_draws"),
    ("unknown-layer", _edited(lambda s: s.update({"99": _first(s)})), "layer '99'"),
]


@pytest.mark.parametrize("name, damage, message", DAMAGED_STATES, ids=[case[0] for case in DAMAGED_STATES])
def test_a_damaged_routing_state_is_refused_naming_the_file(tmp_path, name, damage, message):
    fields = dict(routing="topk")
    _train(tmp_path, fields, None, resume=False)
    state = tmp_path / "out" / "checkpoint-2" / "routing_state_0.json"
    state.write_text(damage(state.read_text()))
    model = tiny_model(*VIT, **fields)
    trainer = CometTrainer(
        model=model,
        args=args(tmp_path, max_steps=4, per_device_train_batch_size=4, save_strategy="no"),
        train_dataset=ListDataset(rows_of("comet_vit", 16)),
    )
    counts = [block.selection_counts.clone() for block in model.moe_blocks()]
    with pytest.raises(ValueError, match=message) as error:
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert str(state) in str(error.value)
    for block, before in zip(model.moe_blocks(), counts, strict=True):
        assert torch.equal(block.selection_counts, before)  # nothing half-restored
