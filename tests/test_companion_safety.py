"""What a conversion carries over from its source is untrusted (issue 22, class 1): a companion file that is a
symbolic link out of the source never lands in the checkpoint, links inside it are copied as regular files, and the
source card's front matter reaches the new card only as validated values (no alias bomb, no markup)."""

import os
import time

import pytest
import transformers
import yaml

from hf_comet.convert import convert_to_moe
from hf_comet.convert.companions import (
    MAX_CARD_BYTES,
    inherited_card_metadata,
    read_conversion_source,
)

SECRET = "AWS_SECRET_ACCESS_KEY=do-not-publish\n"


@pytest.fixture
def bert_source(tmp_path):
    """A stock BERT checkpoint folder with a real vocab.txt, and a secret file outside it."""
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    source = tmp_path / "bert"
    transformers.BertModel(config).save_pretrained(source)
    (source / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    secret = tmp_path / "secret.env"
    secret.write_text(SECRET)
    return source, secret


def test_a_companion_link_out_of_the_source_is_not_copied(bert_source, tmp_path):
    source, secret = bert_source
    (source / "tokenizer_config.json").symlink_to(secret)
    (source / "special_tokens_map.json").symlink_to("/etc/passwd")
    with pytest.warns(UserWarning, match="leads outside"):
        moe = convert_to_moe(str(source), method="comet", comet_keep_rate=0.5)
    destination = tmp_path / "moe"
    moe.save_pretrained(destination)
    assert (destination / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert not (destination / "tokenizer_config.json").exists()
    assert not (destination / "special_tokens_map.json").exists()
    for path in destination.rglob("*"):
        assert not path.is_symlink()
        if path.is_file():
            assert b"do-not-publish" not in path.read_bytes() and b"root:" not in path.read_bytes()


def test_a_companion_link_inside_the_source_is_copied_as_a_regular_file(bert_source, tmp_path):
    source, _ = bert_source
    (source / "real_vocab.txt").write_text("[PAD]\n[CLS]\n")
    (source / "vocab.txt").unlink()
    (source / "vocab.txt").symlink_to(source / "real_vocab.txt")
    moe = convert_to_moe(str(source), method="comet", comet_keep_rate=0.5)
    moe.save_pretrained(tmp_path / "moe")
    copied = tmp_path / "moe" / "vocab.txt"
    assert not copied.is_symlink() and copied.read_text() == "[PAD]\n[CLS]\n"


def test_companions_that_are_not_regular_files_are_skipped(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "vocab.txt").mkdir()  # a folder by a companion's name
    os.mkfifo(source / "merges.txt")  # reading a FIFO would hang
    (source / "vocab.json").symlink_to(tmp_path / "nowhere")  # dangling
    assert read_conversion_source(str(source)).files == {}


def test_hub_cache_links_are_followed_only_inside_the_repo_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir()
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "1111").write_text('{"model_max_length": 32}')
    (snapshot / "tokenizer_config.json").symlink_to("../../blobs/1111")
    (tmp_path / "secret.env").write_text(SECRET)
    (snapshot / "vocab.txt").symlink_to(tmp_path / "secret.env")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.warns(UserWarning, match="leads outside"):
        source = read_conversion_source("org/tiny")
    assert set(source.files) == {"tokenizer_config.json"}
    assert source.base_model == "org/tiny"


CARD_CASES = [
    # (front matter, what is inherited, base model)
    ("license: mit\nlanguage: [en, de]\ndatasets: [org/data]\nbase_model: org/base", {"license": "mit",
     "language": ["en", "de"], "datasets": ["org/data"]}, "org/base"),
    ("license: 'mit\n\n---\n<script>alert(1)</script>'", {}, None),
    ("license: mit\nlanguage: '<img src=x onerror=alert(1)>'", {"license": "mit"}, None),
    ("datasets: ['../../etc', 'ok/data']\nlicense_link: 'javascript:alert(1)'", {}, None),
    ("license: other\nlicense_link: https://example.org/license.txt", {"license": "other",
     "license_link": "https://example.org/license.txt"}, None),
    ("base_model: /home/me/models/secret\nlicense: apache-2.0", {"license": "apache-2.0"}, None),
    ("language: " + str(["en"] * 1000), {}, None),
]  # fmt: skip


@pytest.mark.parametrize("front, expected, base", CARD_CASES)
def test_card_metadata_is_rebuilt_from_validated_values(tmp_path, front, expected, base):
    source = tmp_path / "src"
    source.mkdir()
    (source / "README.md").write_text(f"---\n{front}\n---\n\n# a card\n<script>bad()</script>\n")
    inherited = read_conversion_source(str(source))
    assert inherited.card == expected
    assert inherited.base_model == base


def test_a_yaml_alias_bomb_is_refused_not_expanded(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]"
        for i in range(8)
    ]
    lines.append("datasets: *i")  # 9**9 = 387 million entries once expanded
    source = tmp_path / "src"
    source.mkdir()
    (source / "README.md").write_text("---\n" + "\n".join(lines) + "\n---\n")
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="not plain YAML"):
        inherited = read_conversion_source(str(source))
    assert inherited.card == {} and time.perf_counter() - start < 30  # generous: expansion would not finish


def test_an_oversized_card_is_not_read(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "README.md").write_text("---\nlicense: mit\n---\n" + "x" * (MAX_CARD_BYTES + 1))
    with pytest.warns(UserWarning, match="over"):
        assert read_conversion_source(str(source)).card == {}


def test_inherited_values_dump_back_to_the_same_yaml():
    card, base = inherited_card_metadata(
        {"license": "mit", "language": "en", "datasets": ["a/b"], "base_model": ["c/d"]}
    )
    assert yaml.safe_load(yaml.safe_dump(card)) == card == {"license": "mit", "language": "en", "datasets": ["a/b"]}
    assert base == "c/d"
