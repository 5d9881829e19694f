"""PEFT LoRA on hf_comet models: default targets per family, attention and packed experts adapted, adapters that
save/load and merge to identical outputs, one test per family."""

import peft
import pytest
import torch
from conftest import main_output, tiny_inputs, tiny_model

from hf_comet.lora import lora_config, lora_targets

CASES = [
    ("comet_gpt2", "AutoModelForCausalLM", ("experts",)),
    ("comet_gpt2", "AutoModelForCausalLM", ("attention",)),
    ("comet_vit", "AutoModelForImageClassification", ("attention", "experts")),
    ("comet_bert", "AutoModelForSequenceClassification", ("attention", "experts")),
]


@pytest.mark.parametrize("routing", ["comet", "topk", "attentive"])
@pytest.mark.parametrize("family, head, parts", CASES)
def test_lora_trains_saves_loads_and_merges_to_identical_outputs(family, head, parts, routing, tmp_path):
    model = tiny_model(family, head, routing=routing)
    peft_model = peft.get_peft_model(model, lora_config(model, parts, r=4))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if "experts" in parts:
        assert any("experts" in n for n in trainable)
    if "attention" in parts:
        assert any("attn" in n or "attention" in n for n in trainable)
    # one training step moves the output away from the base model's (LoRA B starts at zero)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.train()
    out = peft_model(**tiny_inputs(family, head))
    out.loss.backward()
    grads = [
        p.grad for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n
    ]  # A gets none while B = 0
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    optimizer.step()
    peft_model.eval()
    inputs = tiny_inputs(family, head, with_labels=False)
    with torch.no_grad():
        adapted = main_output(peft_model(**inputs))
        base = main_output(tiny_model(family, head, routing=routing).eval()(**inputs))
    assert (adapted - base).abs().max() > 1e-6
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(tiny_model(family, head, routing=routing), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs)), adapted, rtol=0, atol=1e-6)
        merged = loaded.merge_and_unload().eval()
        assert type(merged).__name__.startswith("Comet")
        torch.testing.assert_close(main_output(merged(**inputs)), adapted, rtol=1e-4, atol=1e-5)


def test_lora_targets_per_family_and_the_gpt2_conv1d_limit():
    bert = tiny_model("comet_bert", "AutoModel")
    assert lora_targets(bert) == {
        "target_modules": ["query", "key", "value", "attention.output.dense"],
        "target_parameters": ["experts.up_proj", "experts.down_proj"],
    }
    gpt2 = tiny_model("comet_gpt2", "AutoModel")
    assert lora_targets(gpt2, ("attention",))["fan_in_fan_out"] is True
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        lora_targets(gpt2)
    with pytest.raises(ValueError, match="parts="):
        lora_targets(bert, ("router",))
