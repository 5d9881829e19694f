"""Test fixtures: offline Hub, deterministic CPU, tiny configs (hidden 32, 2 layers) for every family and head."""

import os
import tempfile

# Hub settings are read when huggingface_hub is imported: set them before anything imports transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the execution thresholds are the defaults (written out: an HF_COMET_EXECUTION that is no file is warned about),
# whatever `hf-comet bench execution --calibrate` saved on this machine
os.environ["HF_COMET_EXECUTION"] = os.path.join(tempfile.mkdtemp(prefix="hf-comet-tests-"), "defaults.json")
with open(os.environ["HF_COMET_EXECUTION"], "w") as _defaults:
    _defaults.write('{"thresholds": {"dense_block_fraction": 0.875, "slab_max_pairs_per_expert": 8.0, '
                    '"loop_slab_max_pairs_per_expert": 2.0}, "measured": {}}')

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig  # noqa: E402

import hf_comet  # noqa: E402  (registers the model types)
from hf_comet.modeling.moe_routers import ROUTER_CLASSES  # noqa: E402

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()

TINY = {
    "comet_gpt2": dict(
        n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2
    ),
    "comet_vit": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=8,
        patch_size=4,
        num_channels=1,
    ),
    "comet_bert": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=64,
        max_position_embeddings=32,
    ),
}

HEADS = {
    "comet_gpt2": ["AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"],
    "comet_vit": ["AutoModel", "AutoModelForImageClassification"],
    "comet_bert": [
        "AutoModel",
        "AutoModelForMaskedLM",
        "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification",
    ],
}

ALL_HEADS = [(family, head) for family, heads in HEADS.items() for head in heads]

MORE_HEADS = {
    "comet_gpt2": ["AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "CometGPT2DoubleHeadsModel"],
    "comet_vit": ["AutoModelForMaskedImageModeling"],
    "comet_bert": [
        "AutoModelForPreTraining",
        "AutoModelForCausalLM",
        "AutoModelForNextSentencePrediction",
        "AutoModelForMultipleChoice",
        "AutoModelForQuestionAnswering",
    ],
}
"""The rest of the upstream heads (issue 13): every test of the heads above that is about the head (exactness,
round trips, remote code, conversion) runs on these too, over fewer routings where the test is about the router
(tests/test_heads.py)."""
MORE = [(family, head) for family, heads in MORE_HEADS.items() for head in heads]
EVERY_HEAD = ALL_HEADS + MORE
MULTIPLE_CHOICE_HEADS = ("AutoModelForMultipleChoice", "CometGPT2DoubleHeadsModel")
NUM_CHOICES = 2


ROUTING_NAMES = ["comet", "block_comet", "topk", "noisy_topk", "switch", "attentive", "deep", "hash"]
"""Every router; ``block_comet`` is test shorthand for ``routing="comet", comet_block_size=BLOCK_SIZE``."""
LEARNED = {"topk", "noisy_topk", "switch", "attentive", "deep"}
BLOCK_SIZE = 16


HEAD_CONFIG = {
    "AutoModelForMaskedImageModeling": dict(encoder_stride=4),  # the decoder upsamples by the patch size
    "AutoModelForQuestionAnswering": dict(num_labels=2),  # BERT's QA layer has num_labels outputs: start and end
    ("comet_bert", "AutoModelForCausalLM"): dict(is_decoder=True),
    ("comet_gpt2", "AutoModelForTokenClassification"): dict(classifier_dropout=0.0),  # dropout off, as everywhere
    ("comet_gpt2", "CometGPT2DoubleHeadsModel"): dict(summary_first_dropout=0.0),
}
"""Config fields a head needs (upstream's testers set the same)."""


def tiny_config(family: str, head: str | None = None, **overrides):
    """A tiny config of ``family`` with dropout off (so outputs are comparable) and 3 labels (plus what ``head``
    needs, `HEAD_CONFIG`)."""
    if overrides.get("routing") == "block_comet":
        overrides = dict(overrides, routing="comet", comet_block_size=overrides.get("comet_block_size", BLOCK_SIZE))
    kwargs = dict(TINY[family], num_labels=3)
    kwargs.update(HEAD_CONFIG.get(head, {}) | HEAD_CONFIG.get((family, head), {}))
    # 4 experts, 2 per token, for the routings that read those fields (a field a routing ignores is refused)
    router = ROUTER_CLASSES.get(overrides.get("routing", "comet"))
    reads = router.config_fields if router is not None else ("num_experts", "num_experts_per_tok")
    kwargs.update({k: v for k, v in dict(num_experts=4, num_experts_per_tok=2).items() if k in reads})
    dropout_keys = {
        "comet_gpt2": ["resid_pdrop", "embd_pdrop", "attn_pdrop"],
        "comet_vit": ["hidden_dropout_prob", "attention_probs_dropout_prob"],
        "comet_bert": ["hidden_dropout_prob", "attention_probs_dropout_prob"],
    }[family]
    kwargs.update(dict.fromkeys(dropout_keys, 0.0))
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def head_class(family: str, head: str) -> type:
    """The class a user loads ``head`` with: the Auto class, or our class for a head without one."""
    return getattr(transformers, head, None) or hf_comet.modeling.FAMILY_ADAPTERS[family].model_classes[head]


def tiny_model(family: str, head: str, **overrides):
    torch.manual_seed(0)
    config = tiny_config(family, head, **overrides)
    cls = head_class(family, head)
    return cls.from_config(config) if head.startswith("Auto") else cls(config)


def tiny_inputs(family: str, head: str, batch: int = 3, seq: int = 7, with_labels: bool = True, seed: int = 0):
    """Inputs (and labels where the head takes them) with right padding in the last row for text models; the
    multiple-choice heads get (batch, NUM_CHOICES, seq) with padding in the last choice of the last row."""
    g = torch.Generator().manual_seed(seed)
    if family == "comet_vit":
        inputs = {"pixel_values": torch.randn(batch, 1, 8, 8, generator=g)}
        if head == "AutoModelForMaskedImageModeling":  # 4 patches of 4x4; mask half of them
            inputs["bool_masked_pos"] = torch.rand(batch, 4, generator=g) < 0.5
        if with_labels and head == "AutoModelForImageClassification":
            inputs["labels"] = torch.randint(0, 3, (batch,), generator=g)
        return inputs
    shape = (batch, NUM_CHOICES, seq) if head in MULTIPLE_CHOICE_HEADS else (batch, seq)
    input_ids = torch.randint(3, 64, shape, generator=g)
    attention_mask = torch.ones(shape, dtype=torch.long)
    attention_mask[(-1,) * (len(shape) - 1) + (slice(-2, None),)] = 0  # the last row's (last choice's) 2 tokens
    input_ids[attention_mask == 0] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if head == "CometGPT2DoubleHeadsModel":  # the token each choice is scored at: its last non-pad token
        inputs["mc_token_ids"] = attention_mask.sum(-1) - 1
    if not with_labels:
        return inputs
    token_labels = {"AutoModelForTokenClassification": 3, "AutoModelForCausalLM": 64, "AutoModelForMaskedLM": 64}
    token_labels |= {"AutoModelForPreTraining": 64, "CometGPT2DoubleHeadsModel": 64}
    if head in token_labels:
        labels = torch.randint(0, token_labels[head], shape, generator=g)
        labels[attention_mask == 0] = -100
        inputs["labels"] = labels
    if head == "AutoModelForSequenceClassification":
        inputs["labels"] = torch.randint(0, 3, (batch,), generator=g)
    elif head in ("AutoModelForNextSentencePrediction", "AutoModelForMultipleChoice"):
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=g)
    elif head == "AutoModelForPreTraining":
        inputs["next_sentence_label"] = torch.randint(0, 2, (batch,), generator=g)
    elif head == "CometGPT2DoubleHeadsModel":
        inputs["mc_labels"] = torch.randint(0, NUM_CHOICES, (batch,), generator=g)
    elif head == "AutoModelForQuestionAnswering":
        inputs["start_positions"] = torch.randint(0, seq - 2, (batch,), generator=g)
        inputs["end_positions"] = torch.randint(0, seq - 2, (batch,), generator=g)
    return inputs


MAIN_OUTPUTS = ("logits", "prediction_logits", "start_logits", "reconstruction", "last_hidden_state")


def main_output(outputs):
    """The tensor a user compares: logits for heads (the LM / start logits / reconstruction of the heads with
    several), the last hidden state for base models."""
    return next(outputs[name] for name in MAIN_OUTPUTS if name in outputs)


@pytest.fixture(params=ROUTING_NAMES)
def routing(request):
    return request.param


# -- dense reference models ---------------------------------------------------------------------------------------
DENSE_FFN_KEY = {
    # family -> regex over the dense state-dict key: (block prefix, first|second projection, weight|bias)
    "comet_gpt2": (r"(.*\.h\.\d+)\.mlp\.(c_fc|c_proj)\.(weight|bias)", "mlp", {"c_fc": "up", "c_proj": "down"}),
    "comet_vit": (r"(.*\.layers\.\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", "mlp", {"fc1": "up", "fc2": "down"}),
    # anchored on `.layer.N.output.dense`: `attention.output.dense` must not match (notes §3.3)
    "comet_bert": (
        r"(.*\.layer\.\d+)\.(intermediate|output)\.dense\.(weight|bias)",
        "intermediate",
        {"intermediate": "up", "output": "down"},
    ),
}


def dense_twin(moe_model):
    """The stock transformers model with the same architecture and head as ``moe_model``, and its weights, with
    every MoE FFN holding copies of the dense FFN (one group for COMET, ``num_experts`` copies for learned routers),
    or, for block-COMET, the dense FFN split into consecutive blocks with the second bias as the shared output bias."""
    import re

    from hf_comet.modeling.family_adapter import upstream_class

    family = moe_model.config.model_type
    stock_class = upstream_class(type(moe_model))
    config_dict = moe_model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        config_dict.pop(key, None)
    stock_config = {
        "comet_gpt2": transformers.GPT2Config,
        "comet_vit": transformers.ViTConfig,
        "comet_bert": transformers.BertConfig,
    }[family]
    torch.manual_seed(1)
    dense = stock_class(stock_config(**config_dict)).eval()

    pattern, block_name, which = DENSE_FFN_KEY[family]
    moe_state = moe_model.state_dict()
    mapped = {}
    for key, value in dense.state_dict().items():
        match = re.fullmatch(pattern, key)
        if match is None:
            mapped[key] = value
            continue
        prefix, module, kind = match.groups()
        target = f"{prefix}.{block_name}.experts.{which[module]}_proj" + ("_bias" if kind == "bias" else "")
        if family == "comet_gpt2" and kind == "weight":
            value = value.t()  # Conv1D stores (in, out); experts use nn.Linear's (out, in)
        if target not in moe_state:  # block-COMET: the second bias is added once
            mapped[target.replace("down_proj_bias", "output_bias")] = value.clone()
            continue
        num_experts, *expert_shape = moe_state[target].shape
        if list(value.shape) == expert_shape:  # one copy per expert
            mapped[target] = value.unsqueeze(0).expand(num_experts, *value.shape).clone()
        elif which[module] == "up":  # (F, d) -> (E, F/E, d); (F,) -> (E, F/E)
            mapped[target] = value.reshape(num_experts, *expert_shape).clone()
        else:  # down weight (d, F) -> (E, d, F/E)
            mapped[target] = value.reshape(value.shape[0], num_experts, -1).permute(1, 0, 2).clone()
    missing, unexpected = moe_model.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    assert all(".router." in k or k.endswith(".routing_record") for k in missing), missing
    return dense


@pytest.fixture(scope="session")
def quick_reproduction(tmp_path_factory):
    """Every claim of ``hf-comet reproduce --quick``, run once per session from a fresh working folder:
    ``(folder, results)``; the claims' cache is ``folder/cache/quick``. The claim tests render from it, which
    checks both halves (running, then reusing) without running each quick claim twice."""
    from hf_comet.reproduce import reproduce

    folder = tmp_path_factory.mktemp("reproduce")
    before = os.getcwd()
    os.chdir(folder)  # relative paths as a user gives them; the quick page must stay under the cache
    try:
        results = reproduce(quick=True, cache_dir="cache")
    finally:
        os.chdir(before)
    return folder, results


def _rank_main(rank: int, fn, world_size: int, folder: str, args: tuple) -> None:
    """One spawned rank of `run_ranks`: join the gloo group, run ``fn``, write its JSON value to ``rank<r>.json``."""
    import json

    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        value = fn(rank, *args)
    finally:
        torch.distributed.destroy_process_group()
    path = os.path.join(folder, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def run_ranks(fn, world_size: int, folder, *args, timeout: float = 300.0) -> list:
    """``fn(rank, *args)`` in ``world_size`` spawned processes of one gloo group (a file store in ``folder``); each
    rank's JSON-able return value, by rank.

    No ``multiprocessing.Manager``: its server process is forked from this multi-threaded one, where a lock held by
    another thread at the fork deadlocks it, and the test then hangs for good (CI, stop 24). A rank that raises fails
    the test with its traceback; ranks still running after ``timeout`` seconds are killed and the test fails."""
    import json
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(
        _rank_main, args=(fn, world_size, str(folder), args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{getattr(fn, '__name__', fn)} on {world_size} processes did not finish in {timeout:g} s")
    return [json.loads(open(os.path.join(str(folder), f"rank{r}.json")).read()) for r in range(world_size)]


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's rendezvous (a fixed one collides between two suites)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
