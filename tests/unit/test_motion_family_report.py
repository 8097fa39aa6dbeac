"""The motion family's report (benchmarks/motion_family.py): the README's tables and paired
differences are generated from its rows, so its arithmetic and its pairing by seed are tested
on rows whose figures are known."""

from helpers import benchmark_script

mf = benchmark_script("motion_family")


def _row(variant, method, seed, linear, knn, size=48):
    return {
        "variant": variant,
        "method": method,
        "seed": seed,
        "size": size,
        "val_linear": linear,
        "val_knn": knn,
        "test_linear": linear,
        "test_knn": knn,
    }


def test_means_and_seed_paired_differences(tmp_path):
    recipe = "DCLR loss.w_s=0"
    rows = [
        _row("translate", "baseline", 0, 0.25, 0.20),
        _row("translate", "baseline", 1, 0.30, 0.30),
        _row("translate", recipe, 1, 0.70, 0.35),  # written out of seed order
        _row("translate", recipe, 0, 0.50, 0.40),
        _row("translate", recipe, 2, 0.90, 0.90),  # no baseline of seed 2: in the mean, not paired
        _row("hard", "baseline", 0, 0.20, 0.10),
        # a val-only run: no test figures
        {k: v for k, v in _row("hard", recipe, 0, 0.30, 0.30).items() if not k.startswith("test")},
    ]
    mf.report(rows, tmp_path)

    text = (tmp_path / "motion_family.txt").read_text()
    # mean +- sample std (n) over the three seeds of the recipe: 70.0 +- 20.0
    assert f"{recipe:26s} | " + " | ".join(["70.0 +- 20.0 (3)".rjust(17), "55.0 +- 30.4 (3)".rjust(17)]) in text
    # paired by seed, not by order: seed 0 +25.0, seed 1 +40.0 linear; +20.0 and +5.0 k-NN
    assert f"{recipe} - baseline, test linear probe: seed 0 +25.0, seed 1 +40.0; mean +32.5" in text
    assert f"{recipe} - baseline, test k-NN: seed 0 +20.0, seed 1 +5.0; mean +12.5" in text
    # a val-only row (no test figures) is in no test table: hard has the baseline alone
    hard = text.split("hard (48 px")[1]
    assert recipe not in hard
    assert (tmp_path / "motion_family.png").stat().st_size > 0


def test_val_only_report_has_no_plot(tmp_path):
    rows = [_row("translate", "baseline", 0, 0.25, 0.25), _row("translate", "DCLR", 0, 0.5, 0.375)]
    mf.report(rows, tmp_path, ("val",))
    assert "DCLR - baseline, val k-NN: seed 0 +12.5; mean +12.5" in (tmp_path / "motion_family_val.txt").read_text()
    assert not (tmp_path / "motion_family_val.png").exists()


def test_a_longer_run_is_a_method_of_its_own():
    # rows resume by label: a --steps run labelled like the default one would be skipped as done
    assert mf._label("DCLR", ["loss.w_s=0"], mf.STEPS) == "DCLR loss.w_s=0"
    assert mf._label("DCLR", ["loss.w_s=0"], 2 * mf.STEPS) == f"DCLR loss.w_s=0 --steps {2 * mf.STEPS}"


def test_a_longer_run_is_paired_with_the_baseline_trained_as_long(tmp_path):
    longer = f"DCLR --steps {2 * mf.STEPS}"
    rows = [
        _row("translate", "baseline", 0, 0.25, 0.25),
        _row("translate", f"baseline --steps {2 * mf.STEPS}", 0, 0.50, 0.25),
        _row("translate", longer, 0, 0.75, 0.50),
    ]
    mf.report(rows, tmp_path)
    text = (tmp_path / "motion_family.txt").read_text()
    assert f"{longer} - baseline --steps {2 * mf.STEPS}, test linear probe: seed 0 +25.0; mean +25.0" in text
    assert f"{longer} - baseline," not in text
    assert f"baseline --steps {2 * mf.STEPS} - baseline" not in text


def test_saved_weights_are_reused_only_for_the_same_run_on_the_same_code(tmp_path, monkeypatch):
    import torch

    # a val-only run's weights, measured on the test split once its recipe is chosen
    monkeypatch.setattr(mf, "_tree", lambda: "tree-a")
    args = ["train.seed=0", "loss.w_s=0"]
    path = mf._weights_path(tmp_path, "DCLR loss.w_s=0 --steps 1920", "hard", 48, 0)
    assert path.name == "DCLR_loss.w_s_0_--steps_1920-seed0.pt"
    assert mf._reusable(path, args) is None  # nothing saved
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, "row": {"overrides": args}, "tree": "tree-a"}, path)
    assert torch.equal(mf._reusable(path, args)["state_dict"]["w"], torch.ones(2))
    assert mf._reusable(path, ["train.seed=1", "loss.w_s=0"]) is None  # another run
    monkeypatch.setattr(mf, "_tree", lambda: "tree-b")
    assert mf._reusable(path, args) is None  # dclr_dist changed since
    # uncommitted changes: no tree to compare, so nothing is reused
    monkeypatch.setattr(mf, "_tree", lambda: "")
    torch.save({"state_dict": {}, "row": {"overrides": args}, "tree": ""}, path)
    assert mf._reusable(path, args) is None
