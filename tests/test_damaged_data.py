"""A user's ``--dataset`` that is empty, damaged or holds a stray label id is refused with one clear
`RecipeArgumentError` before training (issue 22, classes 4 and 6), never a traceback or a giant head."""

import os
import shutil

import datasets
import pytest

from hf_comet.training.recipes import RecipeArgumentError
from hf_comet.training.recipes.data_sources import encode_labels, read_splits


def _saved(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["a b c"] * 20, "label": [0, 1] * 10}).save_to_disk(str(folder))
    return folder


def _truncated_arrow(tmp_path):
    folder = _saved(tmp_path)
    arrow = next(folder.glob("*.arrow"))
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) // 2])
    return folder


def _bad_json(name):
    def make(tmp_path):
        folder = _saved(tmp_path)
        (folder / name).write_text("{not json")
        return folder

    return make


def _file(name, text):
    def make(tmp_path):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    return make


CASES = [
    ("empty-jsonl", _file("d.jsonl", ""), "is empty"),
    ("blank-jsonl", _file("d.jsonl", "\n\n\n"), "no rows|no data"),
    ("empty-csv", _file("d.csv", ""), "is empty"),
    ("broken-jsonl", _file("d.jsonl", '{"text": "a"}\n{"text": \n'), "not a readable json file"),
    ("deep-json", _file("d.json", "[" * 1000 + "]" * 1000), "not a readable json file"),
    ("deeper-json", _file("d.json", "[" * 10000 + "]" * 10000), "not a readable json file"),
    ("truncated-arrow", _truncated_arrow, "damaged"),
    ("bad-state-json", _bad_json("state.json"), "damaged save_to_disk folder"),
    ("bad-dataset-info", _bad_json("dataset_info.json"), "damaged save_to_disk folder"),
]


@pytest.mark.parametrize("name, make, message", CASES, ids=[case[0] for case in CASES])
def test_broken_data_is_refused_by_name(tmp_path, name, make, message):
    path = make(tmp_path)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} if path.is_dir() else path.read_bytes()
    with pytest.raises(RecipeArgumentError, match=message) as error:
        read_splits(str(path), seed=0)
    assert repr(str(path)) in str(error.value)
    after = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} if path.is_dir() else path.read_bytes()
    assert after == before  # nothing written next to the user's data


def test_a_sound_folder_still_reads(tmp_path):
    train, test = read_splits(str(_saved(tmp_path)), seed=0)
    assert (len(train), len(test)) == (16, 4)


@pytest.mark.parametrize(
    "labels, allowed",
    [
        ([0, 1, 2, 1, 0, 2], True),
        ([0, 1, 10**6, 1, 0, 1], False),
        ([0, 2, 2, 0, 2, 0], False),
        (["b", "a", "b", "a"] * 2, True),
    ],
)
def test_integer_labels_are_every_class_zero_to_k_minus_one(labels, allowed):
    half = len(labels) // 2
    train = datasets.Dataset.from_dict({"label": labels[:half]})
    test = datasets.Dataset.from_dict({"label": labels[half:]})
    if allowed:
        _, _, names = encode_labels(train, test, "label", "d.csv")
        assert len(names) == len(set(labels))
    else:
        with pytest.raises(RecipeArgumentError, match="never occur"):
            encode_labels(train, test, "label", "d.csv")


def test_no_datasets_cache_writes_into_a_user_folder(tmp_path):
    folder = _saved(tmp_path)
    names = sorted(os.listdir(folder))
    read_splits(str(folder), seed=1)
    assert sorted(os.listdir(folder)) == names
    shutil.rmtree(folder)
