"""Values from outside the library cannot inject markdown, HTML or YAML into a model card (issue 22, class 1): a
source folder's name, a user's dataset file name, a repo id or base model given in Python, plot file names and
tags are escaped or validated, and the front matter parses back to exactly the values the library chose."""

import re

import pytest
import yaml
from conftest import tiny_model

from hf_comet.cards import card_code, card_text, render_model_card

HOSTILE = [
    "a\n---\nlicense: evil\n---",
    "<script>alert(1)</script>",
    "[click](javascript:alert(1))",
    "`code` break ``out",
    "x" * 5000,
    "line\u2028separator\x00nul",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_outside_text_is_one_inert_line(value):
    for text in (card_text(value), card_code(value)):
        assert "\n" not in text and "\x00" not in text and "\u2028" not in text and len(text) <= 300
    assert "<script" not in card_text(value) and "](" not in card_text(value)
    assert "`" not in card_code(value)


def _front_matter(card) -> dict:
    text = str(card)
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_source_dataset_repo_or_plot_name_stays_out_of_the_card(value):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="comet")
    model.config.conversion_method, model.config.conversion_seed = "comet", 0
    model.config.converted_from = "./" + value
    model.model_tags = [value, "ok-tag"]
    card = render_model_card(
        model, results={"loss": 1.0}, plots=[value + ".png", "loss_curves.png"], base_model=value, repo_id=value,
        dataset_name=value,
    )  # fmt: skip
    data = _front_matter(card)
    assert set(data) <= {"library_name", "license", "pipeline_tag", "tags", "model-index", "base_model", "language",
                         "datasets", "model_name", "eval_results"}  # fmt: skip
    assert not any(line.startswith(("license: evil", "---")) for line in str(card).splitlines()[1:] if line != "---")
    assert "evil" not in str(data.get("license"))
    assert "base_model" not in data and value not in data["tags"] and "ok-tag" in data["tags"]
    body = str(card).split("\n---\n", 1)[1]
    prose = re.sub(
        r"```.*?```", "", re.sub(r"`[^`\n]*`", "", body, flags=re.DOTALL), flags=re.DOTALL
    )  # code shows as text
    assert "<script>" not in prose and "](javascript" not in prose
    assert f"![{value}.png]" not in body and "![loss_curves.png](loss_curves.png)" in body
    assert 'from_pretrained("path/or/org-name")' in body  # an invalid repo id is not quoted into the snippet
    assert all(len(line) < 1000 for line in body.splitlines())


def test_a_user_dataset_name_reaches_the_card_escaped(tmp_path):
    from hf_comet.cli import main

    data = tmp_path / "evil<script>alert(1)<'script>.csv"
    rows = ["text,label"] + [f"word{i % 7} other{i % 3},{i % 2}" for i in range(40)]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", "bert_mlm_cls", "--fast", "--no-progress", "--variants", "comet", "--dataset", str(data),
                 "--output-dir", str(out)]) == 0  # fmt: skip
    card = next(out.rglob("README.md")).read_text()
    assert "<script>" not in card and "&lt;script&gt;" in card
    assert str(tmp_path) not in card  # the file's name, never the absolute local path
