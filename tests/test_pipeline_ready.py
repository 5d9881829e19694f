"""Conversions are pipeline-ready (issue 13 §2): the converted folder carries the source's tokenizer / image
processor and generation config, so ``pipeline(task, model=folder)`` works alone, and its card keeps the source's
license, language, datasets and base model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import pipeline

import hf_comet
from hf_comet import cli
from hf_comet.convert import convert_to_moe

SENTENCES = [
    "the router picks the units that fire",
    "a frozen random projection routes each token",
    "experts overlap and share their weights",
    "dense models compute every unit for every token",
]


def word_tokenizer(kind: str) -> transformers.PreTrainedTokenizerFast:
    """A real tokenizer trained with `tokenizers` on a few sentences (WordLevel; BERT-style special tokens for
    ``kind="bert"``)."""
    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["<unk>", "<pad>", "<eos>"]
    tokenizer = Tokenizer(models.WordLevel(unk_token=specials[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    if kind == "bert":
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]",
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<eos>"
    )


def write_card(folder, **metadata) -> None:
    ModelCard.from_template(ModelCardData(**metadata), template_str="---\n{{ card_data }}\n---\n# source\n").save(
        folder / "README.md"
    )


@pytest.fixture
def gpt2_source(tmp_path):
    tokenizer = word_tokenizer("gpt2")
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer), n_positions=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.generation_config.max_new_tokens = 3  # a source generation setting that must survive the conversion
    folder = tmp_path / "dense-gpt2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_card(folder, license="mit", language="en", datasets=["wikitext"], base_model="openai-community/gpt2")
    return folder


def test_converted_gpt2_generates_with_pipeline_alone_and_keeps_the_source_card(gpt2_source, tmp_path):
    dest = tmp_path / "moe-gpt2"
    assert cli.main(["convert", str(gpt2_source), str(dest), "--method", "comet", "--comet-keep-rate", "1.0"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dest / name).is_file(), name
    generator = pipeline("text-generation", model=str(dest))
    assert isinstance(generator.model, hf_comet.CometGPT2ForCausalLM)
    text = generator("the router picks", do_sample=False)[0]["generated_text"]
    stock = pipeline("text-generation", model=str(gpt2_source))
    assert text == stock("the router picks", do_sample=False)[0]["generated_text"]  # keep 1.0 is the dense model
    assert generator.model.generation_config.max_new_tokens == 3
    card = ModelCard.load(dest / "README.md").data
    assert card.license == "mit" and card.language == "en" and card.datasets == ["wikitext"]
    assert card.base_model == "openai-community/gpt2"


def test_a_local_source_without_base_model_says_so_and_states_no_license(tmp_path):
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64,
        max_position_embeddings=32,
    )
    folder = tmp_path / "dense-bert"
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer = word_tokenizer("bert")
    tokenizer.save_pretrained(folder)
    moe = convert_to_moe(folder, "comet", comet_keep_rate=0.5)
    dest = tmp_path / "moe-bert"
    moe.save_pretrained(dest)
    card = ModelCard.load(dest / "README.md")
    assert card.data.base_model is None and card.data.license is None  # nothing invented
    assert "local folder" in card.text
    features = pipeline("feature-extraction", model=str(dest))
    out = np.asarray(features("experts overlap"))
    assert out.shape[-1] == 32


def test_converted_vit_classifies_images_with_pipeline_alone(tmp_path):
    from PIL import Image

    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=3, id2label={0: "zero", 1: "one", 2: "two"}, label2id={"zero": 0, "one": 1, "two": 2},
    )
    folder = tmp_path / "dense-vit"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    write_card(folder, license="mit", language="en")
    dest = tmp_path / "moe-vit"
    convert_to_moe(folder, "comet", comet_keep_rate=0.5).save_pretrained(dest)
    assert (dest / "preprocessor_config.json").is_file()
    classify = pipeline("image-classification", model=str(dest))
    image = Image.fromarray((np.random.default_rng(0).random((20, 20, 3)) * 255).astype("uint8"))
    labels = {row["label"] for row in classify(image)}
    assert labels <= {"zero", "one", "two"} and labels
    assert ModelCard.load(dest / "README.md").data.license == "mit"


def test_a_tokenizer_the_user_saved_wins_over_the_source_one(gpt2_source, tmp_path):
    moe = convert_to_moe(gpt2_source, "comet")
    dest = tmp_path / "moe"
    dest.mkdir()
    (dest / "tokenizer_config.json").write_text('{"mine": true}')
    (dest / "config.json").write_text("{}")  # a folder that holds a checkpoint: saved by staging, files kept
    moe.save_pretrained(dest)
    assert (dest / "tokenizer_config.json").read_text() == '{"mine": true}'
    assert (dest / "tokenizer.json").is_file()


def test_an_in_memory_source_carries_nothing_and_still_saves(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=40, n_positions=16)
    moe = convert_to_moe(transformers.GPT2LMHeadModel(config), "comet")
    assert moe.conversion_source.files == {} and moe.conversion_source.card == {}
    moe.save_pretrained(tmp_path / "moe")
    assert not (tmp_path / "moe" / "tokenizer.json").exists()


def test_a_hub_source_is_read_from_the_cache_and_named_as_base_model(gpt2_source, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    repo = cache / "models--org--tiny-gpt2"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(gpt2_source, snapshot)
    (snapshot / "README.md").unlink()
    write_card(snapshot, license="mit", language="en")  # a Hub source's card names no base model
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(transformers.utils.hub, "HF_HUB_CACHE", str(cache), raising=False)
    moe = convert_to_moe("org/tiny-gpt2", "comet")
    assert "tokenizer.json" in moe.conversion_source.files and moe.conversion_source.base_model == "org/tiny-gpt2"
    dest = tmp_path / "moe"
    moe.save_pretrained(dest)
    card = ModelCard.load(dest / "README.md").data
    assert card.base_model == "org/tiny-gpt2" and card.license == "mit"
    assert pipeline("text-generation", model=str(dest))("the router", do_sample=False)[0]["generated_text"]
