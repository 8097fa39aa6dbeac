"""Public datasets packed as they ship: UCF-101, HMDB-51, Kinetics and SSv2 split files, one class list.

Each test builds a small tree in the dataset's official layout (annotation files in their
public formats, a few tiny real videos), packs one split and checks that every listed video
is packed or rejected with a reason, that labels follow the official numbering, that missing
videos are rejects and that videos of other splits are not packed.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from dclr_dist.config import ShardConfig
from dclr_dist.shard import datasets
from dclr_dist.shard.__main__ import main
from dclr_dist.shard.pack import PackError, list_inputs, pack

CFG = ShardConfig(short_side=32, max_samples=2)


def _encode(path: Path, codec: str, fmt: str, seed: int) -> None:
    """A real 8-frame 48x32 video: what a decoder sees in a dataset, at a fraction of the cost."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    _encode(folder / "a.mp4", "libx264", "mp4", 0)
    _encode(folder / "a.webm", "libvpx", "webm", 1)
    return {"mp4": folder / "a.mp4", "webm": folder / "a.webm"}


def _place(root: Path, rels, video: Path) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(video, root / rel)


def _read(out: Path) -> tuple[dict, dict[str, dict], dict[str, str]]:
    """index.json, the records by source, and the reject reasons by source."""
    index = json.loads((out / "index.json").read_text())
    records = {}
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    r = json.loads(tar.extractfile(m).read())
                    records[r["source"]] = r
    rejects = {r["source"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    return index, records, rejects


def _check_accounting(index: dict, records: dict, rejects: dict, listed: set[str]) -> None:
    """Every listed video of the split is packed or rejected with a reason, and nothing else is."""
    assert index["samples"] + index["rejected"] == index["inputs"] == len(listed)
    assert set(records) | set(rejects) == listed and not set(records) & set(rejects)
    assert all(reason for reason in rejects.values())
    for r in records.values():
        assert r["label"] == index["classes"].index(r["class"])


# --------------------------------------------------------------------------- UCF-101


def _ucf101(tmp_path: Path, tiny) -> tuple[Path, Path]:
    root, ann = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    ann.mkdir()
    # The file's numbers rule, not the alphabet: this classInd is deliberately not sorted.
    (ann / "classInd.txt").write_bytes(b"1 YoYo\r\n2 ApplyEyeMakeup\r\n3 HandstandPushups\r\n4 Archery\r\n")
    (ann / "trainlist01.txt").write_bytes(
        b"YoYo/v_YoYo_g08_c01.avi 1\r\n"
        b"ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 2\r\n"
        b"HandstandPushups/v_HandStandPushups_g08_c01.avi 3\r\n"
        b"ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi 2\r\n"
    )  # not on disk
    (ann / "testlist01.txt").write_bytes(b"YoYo/v_YoYo_g01_c01.avi\r\nArchery/v_Archery_g01_c01.avi\r\n")
    (ann / "trainlist02.txt").write_bytes(b"YoYo/v_YoYo_g01_c01.avi 1\r\nArchery/v_Archery_g01_c01.avi 4\r\n")
    (ann / "testlist02.txt").write_bytes(b"YoYo/v_YoYo_g08_c01.avi\r\n")
    _place(
        root,
        [
            "YoYo/v_YoYo_g08_c01.avi",
            "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
            "HandstandPushups/v_HandstandPushups_g08_c01.avi",  # case differs from the list, as in some copies
            "YoYo/v_YoYo_g01_c01.avi",
            "Archery/v_Archery_g01_c01.avi",
        ],
        tiny["mp4"],
    )
    return root, ann


def test_ucf101_official_split_and_class_numbering(tmp_path, tiny):
    root, ann = _ucf101(tmp_path, tiny)
    out = tmp_path / "out"
    index = pack(
        datasets.spec("ucf101", root, annotations=ann, fold=1), str(out), CFG, split="train", progress=False
    ).index
    index, records, rejects = _read(out)

    train01 = {
        "YoYo/v_YoYo_g08_c01.avi",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
        "HandstandPushups/v_HandStandPushups_g08_c01.avi",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi",
    }
    _check_accounting(index, records, rejects, train01)
    assert index["classes"] == ["YoYo", "ApplyEyeMakeup", "HandstandPushups", "Archery"]  # classInd order
    assert {s: r["label"] for s, r in records.items()} == {  # classInd number - 1
        "YoYo/v_YoYo_g08_c01.avi": 0,
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi": 1,
        "HandstandPushups/v_HandStandPushups_g08_c01.avi": 2,
    }
    assert rejects["ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi"].startswith("missing: ")
    assert index["reject_reasons"] == {"missing": 1}
    assert all(r["split"] == "train" and r["meta"] == {"fold": "1"} for r in records.values())
    assert index["source"].startswith("ucf101:") and "fold=1" in index["source"]

    # The test list has no labels: the class comes from the folder, numbered by classInd.
    test, classes = list_inputs(datasets.spec("ucf101", root, annotations=ann, fold=1), "test")
    assert classes == index["classes"]
    assert [(i.source, i.label, i.split, i.problem) for i in test] == [
        ("YoYo/v_YoYo_g01_c01.avi", "YoYo", "test", None),
        ("Archery/v_Archery_g01_c01.avi", "Archery", "test", None),
    ]
    # Another fold is another list; the annotations folder next to the videos is found unasked.
    fold2, _ = list_inputs(datasets.spec("ucf101", root, fold=2), "train")
    assert [(i.source, i.label) for i in fold2] == [
        ("YoYo/v_YoYo_g01_c01.avi", "YoYo"),
        ("Archery/v_Archery_g01_c01.avi", "Archery"),
    ]


# --------------------------------------------------------------------------- HMDB-51


def test_hmdb51_split_files_through_the_cli(tmp_path, tiny, capsys):
    root, ann = tmp_path / "hmdb51_org", tmp_path / "test_train_splits" / "testTrainMulti_7030_splits"
    ann.mkdir(parents=True)
    split1 = {  # as shipped: "<video> <code> " with a trailing space; 1 train, 2 test, 0 unused
        "sword": "Sword_u_cm_np1_fr_goo_0.avi 1 \nSword_u_cm_np1_fr_goo_1.avi 2 \nSword_u_cm_np1_fr_goo_2.avi 0 \n",
        "brush_hair": "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 2 \nApril_09_brush_hair_u_nm_np1_ba_goo_1.avi 1 \n",
        "cartwheel": "Cartwheel_f_cm_np1_ba_med_0.avi 2 \nCartwheel_f_cm_np1_ba_med_1.avi 1 \n",
    }
    for cls, text in split1.items():
        (ann / f"{cls}_test_split1.txt").write_text(text)
        swapped = text.replace(" 1 \n", " x \n").replace(" 2 \n", " 1 \n").replace(" x \n", " 2 \n")
        unreadable = "Sword_u_cm_np1_fr_goo_3.avi 7\n" if cls == "sword" else ""
        (ann / f"{cls}_test_split2.txt").write_text(swapped + unreadable)
    on_disk = [f"{cls}/{line.split()[0]}" for cls, text in split1.items() for line in text.splitlines()]
    _place(root, [r for r in on_disk if r != "cartwheel/Cartwheel_f_cm_np1_ba_med_0.avi"], tiny["mp4"])

    out = tmp_path / "out"
    code = main(
        [
            "--dataset",
            "hmdb51",
            "--input",
            str(root),
            "--annotations",
            str(ann.parent),
            "--split",
            "test",
            "--output",
            str(out),
            "--short-side",
            "32",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "packed 2 of 3 inputs" in capsys.readouterr().out
    index, records, rejects = _read(out)

    test1 = {
        "sword/Sword_u_cm_np1_fr_goo_1.avi",
        "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
        "cartwheel/Cartwheel_f_cm_np1_ba_med_0.avi",
    }
    _check_accounting(index, records, rejects, test1)
    assert index["classes"] == ["brush_hair", "cartwheel", "sword"]
    assert {s: r["label"] for s, r in records.items()} == {
        "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi": 0,
        "sword/Sword_u_cm_np1_fr_goo_1.avi": 2,
    }
    assert rejects["cartwheel/Cartwheel_f_cm_np1_ba_med_0.avi"].startswith("missing: ")
    assert index["split"] == "test" and index["source"].startswith("hmdb51:") and "fold=1" in index["source"]
    # fold 2 reads its own files; a line whose code is not 0/1/2 is a reject of either split, never lost
    train2, _ = list_inputs(datasets.spec("hmdb51", root, annotations=ann, fold=2), "train")
    assert {i.source: i.problem for i in train2} == {
        "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi": None,
        "cartwheel/Cartwheel_f_cm_np1_ba_med_0.avi": train2[1].problem,
        "sword/Sword_u_cm_np1_fr_goo_1.avi": None,
        "sword/Sword_u_cm_np1_fr_goo_3.avi": "sword_test_split2.txt line 4: expected '<video> <0|1|2>', got "
        "'Sword_u_cm_np1_fr_goo_3.avi 7'",
    }
    assert train2[1].problem.startswith("missing: ")


# --------------------------------------------------------------------------- Kinetics


def test_kinetics_csvs_missing_videos_and_one_class_list(tmp_path, tiny):
    ann, root = tmp_path / "annotations", tmp_path / "kinetics700"
    ann.mkdir()
    header = "label,youtube_id,time_start,time_end,split,is_cc\n"
    (ann / "train.csv").write_text(
        header + "abseiling,---QUuC4vJs,3,13,train,0\n"
        "passing American football (in game),-0Ga2CBMvqE,0,10,train,0\n"
        "zumba,--Ux7JmJeRo,57,67,train,1\n"
    )
    # validate.csv lacks abseiling: its labels must still be numbered with train's
    (ann / "validate.csv").write_text(
        header + "passing American football (in game),0-ZcW2TsoAo,15,25,validate,0\n"
        "zumba,-9o7bT9Wj8E,120,130,validate,0\n"
        "zumba,kx2KChdqwZE,1,11,validate,0\n"
    )  # never downloaded
    (ann / "test.csv").write_text("youtube_id,time_start,time_end,split\nabcdefghijk,0,10,test\n")  # no labels
    (ann / "README.txt").write_text("not a CSV\n")
    _place(
        root / "val",
        ["passing American football (in game)/0-ZcW2TsoAo_000015_000025.mp4", "zumba/-9o7bT9Wj8E_000120_000130.mp4"],
        tiny["mp4"],
    )
    _place(
        root / "train", ["abseiling/---QUuC4vJs_000003_000013.mp4", "zumba/--Ux7JmJeRo_000057_000067.mp4"], tiny["mp4"]
    )
    (root / "val" / "zumba" / "kx2KChdqwZE_000001_000011.mp4.part").write_bytes(b"")  # a download cut short

    out = tmp_path / "out"
    # IN holds both split folders here: only the val rows' videos may be packed
    pack(datasets.spec("kinetics", root, annotations=ann), str(out), CFG, split="val", progress=False)
    index, records, rejects = _read(out)

    _check_accounting(
        index,
        records,
        rejects,
        {
            "val/passing American football (in game)/0-ZcW2TsoAo_000015_000025.mp4",
            "val/zumba/-9o7bT9Wj8E_000120_000130.mp4",
            "kx2KChdqwZE_000001_000011.mp4",
        },
    )
    assert index["classes"] == ["abseiling", "passing American football (in game)", "zumba"]
    assert {r["class"]: r["label"] for r in records.values()} == {"passing American football (in game)": 1, "zumba": 2}
    assert rejects["kx2KChdqwZE_000001_000011.mp4"].startswith("missing: kx2KChdqwZE_000001_000011.mp4")
    assert index["reject_reasons"] == {"missing": 1}
    r = records["val/zumba/-9o7bT9Wj8E_000120_000130.mp4"]
    assert r["split"] == "val" and r["meta"] == {
        "youtube_id": "-9o7bT9Wj8E",
        "time_start": "120",
        "time_end": "130",
        "is_cc": "0",
    }

    # Flat downloads (one folder of <id>_<start>_<end>.mp4) and one CSV given: the same numbering for train.
    flat = tmp_path / "flat"
    _place(flat, ["---QUuC4vJs_000003_000013.mp4", "-0Ga2CBMvqE_000000_000010.mp4"], tiny["mp4"])
    train, classes = list_inputs(datasets.spec("kinetics", flat, annotations=ann / "train.csv"), "train")
    assert classes == index["classes"]
    assert [(i.source, i.label, i.problem is None) for i in train] == [
        ("---QUuC4vJs_000003_000013.mp4", "abseiling", True),
        ("-0Ga2CBMvqE_000000_000010.mp4", "passing American football (in game)", True),
        ("--Ux7JmJeRo_000057_000067.mp4", "zumba", False),
    ]
    with pytest.raises(PackError, match=r"test.csv: the test rows have no label column"):
        list_inputs(datasets.spec("kinetics", flat, annotations=ann), "test")


# --------------------------------------------------------------------------- Something-Something v2


def test_ssv2_labels_json_and_templates(tmp_path, tiny):
    ann, root = tmp_path / "labels", tmp_path / "20bn-something-something-v2"
    ann.mkdir()
    (ann / "labels.json").write_text(
        json.dumps(
            {
                "Holding something": "1",
                "Putting something on a surface": "2",
                "Approaching something with your camera": "0",
                "Pushing something from left to right": "3",
            },
            indent=1,
        )
    )
    entry = lambda i, template, things: {
        "id": str(i),
        "label": template.replace("[something]", "{}").format(*things),
        "template": template,
        "placeholders": things,
    }
    (ann / "train.json").write_text(
        json.dumps(
            [entry(78687, "Holding [something]", ["potato"]), entry(42326, "Putting [something] on a surface", ["cup"])]
        )
    )
    (ann / "validation.json").write_text(
        json.dumps(
            [
                entry(74225, "Putting [something] on a surface", ["a pen"]),
                entry(116154, "Holding [something]", ["remote"]),
                entry(3, "Holding [something]", ["keys"]),  # never downloaded
                entry(5, "Spinning [something] that quickly stops spinning", ["coin"]),  # not in labels.json
            ]
        )
    )
    (ann / "test.json").write_text(json.dumps([{"id": "1420"}]))
    _place(root, ["74225.webm", "116154.webm", "78687.webm", "42326.webm", "5.webm"], tiny["webm"])

    out = tmp_path / "out"
    pack(datasets.spec("ssv2", root, annotations=ann), str(out), CFG, split="validation", progress=False)
    index, records, rejects = _read(out)

    _check_accounting(index, records, rejects, {"74225.webm", "116154.webm", "3.webm", "5.webm"})
    assert index["classes"] == [
        "Approaching something with your camera",
        "Holding something",
        "Putting something on a surface",
        "Pushing something from left to right",
    ]
    assert {s: (r["class"], r["label"]) for s, r in records.items()} == {
        "74225.webm": ("Putting something on a surface", 2),
        "116154.webm": ("Holding something", 1),
    }
    assert records["74225.webm"]["meta"] == {
        "id": "74225",
        "template": "Putting [something] on a surface",
        "placeholders": '["a pen"]',
    }
    assert rejects["3.webm"].startswith("missing: 3.webm")
    assert rejects["5.webm"].startswith("unknown class: 'Spinning something that quickly stops spinning'")
    assert index["reject_reasons"] == {"missing": 1, "unknown class": 1}
    with pytest.raises(PackError, match=r"test.json: no templates, so no labels; the test split's are in test-answers"):
        list_inputs(datasets.spec("ssv2", root, annotations=ann), "test")

    # The test split's answers (the current package ships labels/test-answers.csv).
    (ann / "test-answers.csv").write_text("1420;Pushing something from left to right\n")
    _place(root, ["1420.webm"], tiny["webm"])
    test, _ = list_inputs(datasets.spec("ssv2", root, annotations=ann), "test")
    assert [(i.source, i.label, i.problem) for i in test] == [
        ("1420.webm", "Pushing something from left to right", None)
    ]

    # The original 20BN names (PySlowFast reads these), found in the folder or named explicitly.
    bn = tmp_path / "20bn"
    bn.mkdir()
    for short, long in (("labels", "labels"), ("train", "train"), ("validation", "validation")):
        (bn / f"something-something-v2-{long}.json").write_bytes((ann / f"{short}.json").read_bytes())
    for given in (bn, bn / "something-something-v2-validation.json"):
        inputs, classes = list_inputs(datasets.spec("ssv2", root, annotations=given), "validation")
        assert classes == index["classes"] and {i.source for i in inputs} == {
            "74225.webm",
            "116154.webm",
            "3.webm",
            "5.webm",
        }


# --------------------------------------------------------------------------- one class list


def test_manifest_test_split_missing_a_class_keeps_train_numbering(tmp_path, tiny):
    _place(tmp_path, ["a.mp4", "b.mp4", "c.mp4", "d.mp4"], tiny["mp4"])
    (tmp_path / "m.csv").write_text(
        "path,label,split\na.mp4,cat,train\nb.mp4,dog,train\nc.mp4,emu,train\nd.mp4,emu,test\n"
    )
    train, train_classes = list_inputs(str(tmp_path / "m.csv"), "train")
    assert train_classes == ["cat", "dog", "emu"]
    index = pack(str(tmp_path / "m.csv"), str(tmp_path / "test"), CFG, split="test", progress=False).index
    _, records, _ = _read(tmp_path / "test")
    assert index["classes"] == train_classes  # not ["emu"], which would make emu label 0
    assert records["d.mp4"]["label"] == 2


# --------------------------------------------------------------------------- errors


def _cli_error(capsys, out: Path, *argv) -> str:
    assert main([*argv, "--output", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_missing_annotations_and_bad_folds_are_one_line_errors(tmp_path, tiny, capsys):
    root, ann = _ucf101(tmp_path, tiny)
    out = tmp_path / "out"
    (ann / "classInd.txt").unlink()
    err = _cli_error(
        capsys, out, "--dataset", "ucf101", "--input", str(root), "--annotations", str(ann), "--split", "train"
    )
    assert f"{ann / 'classInd.txt'}: not found" in err and "ucfTrainTestlist" in err
    err = _cli_error(capsys, out, "--dataset", "ucf101", "--input", str(root), "--fold", "4", "--split", "train")
    assert "--fold 4" in err and "1, 2 or 3" in err
    err = _cli_error(capsys, out, "--dataset", "hmdb51", "--input", str(root), "--split", "test")
    assert "testTrainMulti_7030_splits" in err and "--annotations" in err
    err = _cli_error(capsys, out, "--dataset", "ucf101", "--input", str(root), "--split", "val")
    assert "train, test" in err
    err = _cli_error(capsys, out, "--dataset", "kinetics", "--input", str(root), "--split", "train")
    assert "needs --annotations" in err
    err = _cli_error(
        capsys,
        out,
        "--dataset",
        "ssv2",
        "--input",
        str(root),
        "--annotations",
        str(tmp_path / "nope"),
        "--split",
        "train",
    )
    assert "nope: no such folder" in err
    assert not out.exists()  # refused before anything was written
    with pytest.raises(SystemExit):  # argparse: --fold without --dataset
        main(["--input", str(root), "--output", "o", "--fold", "2"])
    assert "go with --dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--dataset ucf101", "--dataset hmdb51", "--dataset kinetics", "--dataset ssv2"):
        assert flag in help_text
