"""Test fixtures: offline Hub, deterministic CPU, tiny configs (hidden 32, 2 layers) for every family and head."""

import os

# Hub settings are read when huggingface_hub is imported: set them before anything imports transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig  # noqa: E402

import hf_comet  # noqa: E402, F401  (registers the model types)
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


ROUTING_NAMES = ["comet", "block_comet", "topk", "noisy_topk", "switch", "attentive", "deep"]
"""Every router; ``block_comet`` is test shorthand for ``routing="comet", comet_block_size=BLOCK_SIZE``."""
LEARNED = {"topk", "noisy_topk", "switch", "attentive", "deep"}
BLOCK_SIZE = 16


def tiny_config(family: str, **overrides):
    """A tiny config of ``family`` with dropout off (so outputs are comparable) and 3 labels."""
    if overrides.get("routing") == "block_comet":
        overrides = dict(overrides, routing="comet", comet_block_size=overrides.get("comet_block_size", BLOCK_SIZE))
    kwargs = dict(TINY[family], num_labels=3)
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


def tiny_model(family: str, head: str, **overrides):
    torch.manual_seed(0)
    return getattr(transformers, head).from_config(tiny_config(family, **overrides))


def tiny_inputs(family: str, head: str, batch: int = 3, seq: int = 7, with_labels: bool = True, seed: int = 0):
    """Inputs (and labels where the head takes them) with right padding in the last row for text models."""
    g = torch.Generator().manual_seed(seed)
    if family == "comet_vit":
        inputs = {"pixel_values": torch.randn(batch, 1, 8, 8, generator=g)}
        if with_labels and head == "AutoModelForImageClassification":
            inputs["labels"] = torch.randint(0, 3, (batch,), generator=g)
        return inputs
    input_ids = torch.randint(3, 64, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[-1, -2:] = 0
    input_ids[-1, -2:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_labels:
        if head in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForTokenClassification"):
            upper = 3 if head == "AutoModelForTokenClassification" else 64
            labels = torch.randint(0, upper, (batch, seq), generator=g)
            labels[attention_mask == 0] = -100
            inputs["labels"] = labels
        elif head == "AutoModelForSequenceClassification":
            inputs["labels"] = torch.randint(0, 3, (batch,), generator=g)
    return inputs


def main_output(outputs):
    """The tensor a user compares: logits for heads, the last hidden state for base models."""
    return outputs.logits if "logits" in outputs else outputs.last_hidden_state


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

    family = moe_model.config.model_type
    stock_name = type(moe_model).__name__.replace("Comet", "")
    stock_name = {"GPT2ForCausalLM": "GPT2LMHeadModel"}.get(stock_name, stock_name)
    config_dict = moe_model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        config_dict.pop(key, None)
    stock_config = {
        "comet_gpt2": transformers.GPT2Config,
        "comet_vit": transformers.ViTConfig,
        "comet_bert": transformers.BertConfig,
    }[family]
    torch.manual_seed(1)
    dense = getattr(transformers, stock_name)(stock_config(**config_dict)).eval()

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
