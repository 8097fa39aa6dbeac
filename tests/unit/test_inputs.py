"""The packer's listing is the same whatever the hash seed and however an input is spelled."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dclr_dist.shard import datasets
from dclr_dist.shard.common import PackError
from dclr_dist.shard.inputs import canonical_input, list_inputs


def test_labels_equal_as_numbers_have_one_order_under_any_hash_seed(tmp_path):
    rows = "".join(f"v{i}.mp4,{label}\n" for i, label in enumerate(["1", "01", "001", "10", "2"]))
    (tmp_path / "m.csv").write_text("path,label\n" + rows)
    code = f"from dclr_dist.shard.inputs import list_inputs; print(list_inputs({str(tmp_path / 'm.csv')!r})[1])"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
        ).stdout
        for seed in range(6)
    }
    assert seen == {"['001', '01', '1', '2', '10']\n"}


def test_a_digit_that_is_not_a_number_is_a_label_like_any_other(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.mp4,2\nb.mp4,\u00b2\n")
    assert list_inputs(str(tmp_path / "m.csv"))[1] == ["2", "\u00b2"]


def test_one_file_named_several_ways_in_a_manifest_is_one_input(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"x")
    (tmp_path / "link.mp4").symlink_to(tmp_path / "videos" / "a.mp4")
    (tmp_path / "m.csv").write_text(
        "path,label\n"
        "videos/a.mp4,run\n"
        f"{tmp_path / 'videos' / 'a.mp4'},run\n"
        "link.mp4,jump\n"
        "videos/../videos/a.mp4,run\n"
    )
    inputs, _ = list_inputs(str(tmp_path / "m.csv"))
    assert [i.problem is None for i in inputs] == [True, False, False, False]
    assert all(i.problem.startswith("duplicate: the same file as videos/a.mp4") for i in inputs[1:])
    assert "labelled 'run' there, 'jump' here" in inputs[2].problem


def test_one_input_spelled_several_ways_has_one_canonical_form(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "ln").symlink_to(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    spellings = ["d", "d/", "./d", str(tmp_path / "d"), str(tmp_path / "ln") + "/", "ln/../d"]
    assert len({canonical_input(s) for s in spellings}) == 1
    specs = {canonical_input(datasets.spec("ucf101", s, annotations=s + "/splits")) for s in ("d", str(tmp_path / "d"))}
    assert len(specs) == 1
    assert canonical_input("s3://bucket/m.csv") == "s3://bucket/m.csv"


def _tree(root, files):
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"x")


def test_a_split_first_tree_takes_its_classes_from_the_second_level(tmp_path):
    _tree(tmp_path, ["Train/run/a.mp4", "Train/jump/b.mp4", "test/run/c.mp4", "test/swim/d.mp4", "test/e.mp4"])
    with pytest.raises(PackError, match=r"holds split folders \(Train, test\).*--split"):
        list_inputs(str(tmp_path))  # not the split folders packed as classes
    train, classes = list_inputs(str(tmp_path), "train")  # the folder's case does not matter
    assert classes == ["jump", "run", "swim"]  # every split's classes: one numbering for both packings
    assert sorted((i.source, i.label) for i in train) == [("Train/jump/b.mp4", "jump"), ("Train/run/a.mp4", "run")]
    test, same = list_inputs(str(tmp_path), "test")
    assert same == classes and [i.problem is None for i in sorted(test, key=lambda i: i.source)] == [False, True, True]


def test_split_values_that_differ_in_case_are_the_same_split(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,split\na.mp4,x,Train\nb.mp4,y,TRAIN\nc.mp4,y,test\n")
    inputs, _ = list_inputs(str(tmp_path / "m.csv"), "train")
    assert [i.source for i in inputs] == ["a.mp4", "b.mp4"] and all(i.problem is None for i in inputs)


def test_two_byte_names_that_print_alike_get_two_keys(tmp_path):
    """A Latin-1 name (b"caf\\xe9") prints as "caf\\xe9", as does a UTF-8 name with a backslash."""
    from dclr_dist.shard.inputs import sample_key

    folder = os.fsencode(tmp_path / "cls")
    os.mkdir(folder)
    for name in (b"caf\xe9.mp4", b"caf\\xe9.mp4"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"x")
    inputs, _ = list_inputs(str(tmp_path))
    assert [i.source for i in inputs] == ["cls/caf\\xe9.mp4"] * 2  # what records show
    assert len({sample_key(i) for i in inputs}) == 2
    assert sample_key(next(i for i in inputs if i.raw is None)) == sample_key(
        type(inputs[0])("cls/caf\\xe9.mp4", "", "cls")
    )  # UTF-8 names keep the keys they always had
