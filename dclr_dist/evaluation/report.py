"""The report of ``python -m dclr_dist.eval`` in ``--out``: ``report.json`` (every number),
``report.txt`` (the table printed at the end), and plots: ``per_class.png``,
``retrieval.png``, ``scene.png``.
"""

from __future__ import annotations

import json
from pathlib import Path


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render_table(report: dict) -> str:
    """The report as a plain-text table: protocol, measure, value, chance."""
    m = report["model"]
    lines = [f"checkpoint {report['checkpoint']} ({m['arch']}, width {m['width']}, epoch {report['epoch']})"]
    if "videos" in report:
        split = {name: f"{name} {n} videos" for name, n in report["videos"].items()}
        for name, s in report.get("skipped", {}).items():
            if s["samples"] or s["shards"]:
                shards = f", {s['shards']} shards broken" if s["shards"] else ""
                split[name] += f" ({s['samples']} skipped as damaged or unreadable{shards}; see the warnings)"
        lines.append(
            f"{split['train']}, {split['test']}, {len(report['classes'])} classes, {report['clips']} clips "
            f"of {report['frames']}x{report['size']}x{report['size']} per video"
        )
    rows = [("protocol", "measure", "value", "chance")]
    p = report["protocols"]
    if "linear" in p:
        rows.append(
            (
                "linear",
                f"top-1, test (l2 {p['linear']['l2']:g})",
                _pct(p["linear"]["top1"]),
                _pct(p["linear"]["chance"]),
            )
        )
    if "knn" in p:
        k = p["knn"]
        rows.append(("knn", f"top-1, k={k['k']} t={k['t']:g}", _pct(k["top1"]), _pct(k["chance"])))
        rows += [("knn", f"retrieval {r}", _pct(v), "") for r, v in k["recall"].items()]
        rows.append(("knn", "top-1, centred features", _pct(k["centred"]["top1"]), _pct(k["chance"])))
        rows += [("knn", f"retrieval {r}, centred", _pct(v), "") for r, v in k["centred"]["recall"].items()]
    if "scene" in p:
        s = p["scene"]
        if "skipped" in s:
            rows.append(("scene", "skipped", s["skipped"], ""))
        else:
            for what in ("scene", "motion"):
                probe = s["train_probe"][what]
                rows.append(("scene", f"{what} probe, train 2-fold", _pct(probe["accuracy"]), _pct(probe["chance"])))
            rows.append(("scene", "swap test, unseen scenes", _pct(s["swap"]), "50.0%"))
            rows.append(("scene", "NN same motion, unseen scenes", _pct(s["nn_same_motion"]), ""))
            rows.append(("scene", "NN same scene, unseen scenes", _pct(s["nn_same_scene"]), ""))
    if "finetune" in p:
        ft = p["finetune"]
        rows.append(("finetune", f"top-1, test ({ft['epochs']} epochs)", _pct(ft["top1"]), _pct(ft["chance"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines += [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows
    ]
    return "\n".join(lines)


def write_report(report: dict, out: Path, log=print) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    table = render_table(report)
    (out / "report.txt").write_text(table + "\n")
    plots = plot_report(report, out)
    log(table)
    log(f"eval: {', '.join(str(p) for p in (out / 'report.json', out / 'report.txt', *plots))}")


def plot_report(report: dict, out: Path) -> list[Path]:
    """Per-class accuracy, retrieval recall@K and the scene probe as PNGs, those the report has data for."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    p, written = report["protocols"], []
    per_class = {name: p[name]["per_class"] for name in ("linear", "knn", "finetune") if name in p}
    if per_class:
        classes = report["classes"]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) * len(per_class)), 4))
        width = 0.8 / len(per_class)
        for i, (name, acc) in enumerate(per_class.items()):
            ax.bar([c + i * width for c in range(len(classes))], [acc.get(c, 0) for c in classes], width, label=name)
        ax.axhline(1 / len(classes), color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(classes))], classes, rotation=30, ha="right")
        ax.set(ylabel="test accuracy", ylim=(0, 1), title="per-class accuracy")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "per_class.png", plt))
    if "knn" in p:
        curve = p["knn"]["recall_curve"]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(range(1, len(curve) + 1), curve, marker="." if len(curve) < 60 else None)
        ax.set(
            xscale="log",
            xlabel="K (train videos retrieved)",
            ylabel="recall@K",
            ylim=(0, 1.02),
            title="retrieval, test queries vs train gallery",
        )
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out / "retrieval.png", plt))
    if "scene" in p and "skipped" not in p["scene"]:
        s = p["scene"]
        names = ["scene probe\n(train, 2-fold)", "motion probe\n(train, 2-fold)", "swap test\n(unseen scenes)"]
        values = [s["train_probe"]["scene"]["accuracy"], s["train_probe"]["motion"]["accuracy"], s["swap"] or 0]
        chance = [s["train_probe"]["scene"]["chance"], s["train_probe"]["motion"]["chance"], 0.5]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(range(3), values, color=["tab:orange", "tab:blue", "tab:green"])
        ax.scatter(range(3), chance, marker="_", s=900, color="black", label="chance")
        ax.set_xticks(range(3), names)
        ax.set(ylim=(0, 1), title="scene or motion?")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "scene.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
