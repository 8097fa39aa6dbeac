"""Ray Tune sweeps over DCLR's knobs: ``python -m dclr_dist.sweep``, or ``dclr-tune``.

    python -m dclr_dist.sweep --config demo --num-samples 16      # the shipped search space
    dclr-tune --config demo --space my_space.yaml --num-samples 16
    dclr-tune ... --resume --trust-storage        # continue an interrupted sweep (see below)

``--config`` takes a file or a shipped recipe name (default: the ``demo`` recipe); ``--space``
defaults to the search space shipped with the package (``dclr_dist/sweep_space.yaml``).

Each trial is a Tune function that builds and fits a Ray Train ``TorchTrainer`` (the Ray
2.60 Train V2 pattern: ``Tuner(TorchTrainer(...))`` is not supported) and reports every
epoch through ``TuneReportCallback``. The objective is the in-training k-NN accuracy
(``knn_acc``, mode max; contrastive losses are not comparable across temperatures), so
``eval.every`` is forced to 1. ASHA stops poor trials early; ``--search optuna`` uses
Optuna's TPE (``pip install optuna``). A trial's Train run is named after its trial id,
so a Tune-level retry of the trial resumes the same run from its checkpoint.

Outputs under ``<storage>/<name>/``: ``trials.csv`` (every trial, its parameters and best
k-NN accuracy), ``best.yaml`` (a ready-to-run training config), ``objective.png`` (the
objective against each searched parameter), next to Tune's own experiment state.

Trust: resuming unpickles Tune's experiment state (``tuner.pkl``, each trial's state) from the
sweep's storage, and unpickling can run code: whoever can write there could run code on the
driver. ``--resume`` is therefore refused unless ``--trust-storage`` says that only you (or
people you trust) can write the sweep's storage. Nothing else reads pickles from storage:
training resume, evaluation, export and fine-tuning load tensors and plain data only.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from functools import partial
from pathlib import Path

import yaml

from dclr_dist import storage
from dclr_dist.config import RECIPES, Config, ConfigError, config_from_dict, load_config, read_yaml

OBJECTIVE, MODE = "knn_acc", "max"
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "randint": 2, "choice": None}
# The search space shipped with the package, the default of --space.
SPACE = Path(__file__).with_name("sweep_space.yaml")


class SpaceError(ValueError):
    """The search space file is wrong; the message names the file and the key."""


class SweepError(RuntimeError):
    """The sweep cannot run as asked (e.g. ``resume`` with no sweep to resume); the message says why."""


def load_space(path: str | Path, base: Config) -> dict[str, tuple[str, list]]:
    """``{config key: (distribution, arguments)}``, each key checked against the config."""
    where = str(path)
    raw = read_yaml(path, SpaceError, "search space file")
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(
            f"{where}: must map config keys to {{distribution: arguments}}, e.g. "
            "'loss.tau: {loguniform: [0.03, 0.3]}'"
        )
    space = {}
    for key, spec in raw.items():
        if not isinstance(spec, dict) or len(spec) != 1:
            raise SpaceError(f"{where}: {key} must be one {{distribution: arguments}}, got {spec!r}")
        ((dist, args),) = spec.items()
        if dist not in DISTRIBUTIONS:
            raise SpaceError(f"{where}: {key}: unknown distribution {dist!r} (known: {', '.join(DISTRIBUTIONS)})")
        n = DISTRIBUTIONS[dist]
        if not isinstance(args, list) or (n is not None and len(args) != n) or not args:
            raise SpaceError(
                f"{where}: {key}: {dist} takes {'a non-empty list' if n is None else '[lo, hi]'}, got {args!r}"
            )
        if n is not None and not args[0] < args[1]:
            raise SpaceError(f"{where}: {key}: {dist} needs lo < hi, got {args!r}")
        if dist == "loguniform" and args[0] <= 0:
            raise SpaceError(f"{where}: {key}: loguniform needs lo > 0, got {args!r}")
        # Every value the space can produce must make a valid config: check the ends now,
        # not in the middle of a sweep.
        for value in args if dist == "choice" else [args[0], args[1] - (1 if dist == "randint" else 0)]:
            try:
                config_from_dict(base.to_dict(), where, [f"{key}={json.dumps(value)}"])
            except ConfigError as e:
                raise SpaceError(f"{where}: {key}: {e}") from None
        space[key] = (dist, args)
    return space


def tune_space(space: dict[str, tuple[str, list]]) -> dict:
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    return {k: tune.choice(a) if d == "choice" else make[d](*a) for k, (d, a) in space.items()}


def overrides(params: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in params.items()]


def run_trial(params: dict, base: dict, trials_url: str) -> None:
    """One trial: the sampled parameters over the base config, fitted as a Ray Train run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dclr_dist.train import fit

    # The trial id survives Tune-level retries, so a retried trial resumes its own Train run.
    name = f"trial-{tune.get_context().get_trial_id()}"
    cfg = config_from_dict(
        base, "sweep", [*overrides(params), f"train.name={name}", f"train.storage_path={trials_url}"]
    )
    fit(cfg, callbacks=[TuneReportCallback()])


def concurrency(cfg: Config, requested: int | None) -> int:
    """Trials that fit on the cluster at once, by GPUs when trials use them, else by CPUs."""
    import ray

    total = ray.cluster_resources()
    if cfg.cluster.gpus_per_worker > 0:
        fits = total.get("GPU", 0) // (cfg.cluster.workers * cfg.cluster.gpus_per_worker)
    else:
        fits = total.get("CPU", 1) // (cfg.cluster.workers * cfg.cluster.cpus_per_worker)
    fits = max(1, int(fits))
    return min(fits, requested) if requested else fits


def sweep(
    cfg: Config,
    space: dict,
    *,
    name: str,
    storage_path: str,
    num_samples: int,
    max_concurrent: int | None,
    search: str,
    grace_period: int,
    resume: bool,
):
    """Run (or with ``resume``, continue) the sweep ``name`` under ``storage_path``; returns Tune's
    results and the sweep's URL. Raises :class:`SweepError` when there is nothing to resume."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from dclr_dist.launch import connect_ray

    connect_ray()
    sweep_url = storage.join(storage_path, name)
    trials_url = storage.join(sweep_url, "trials")
    trainable = tune.with_resources(partial(run_trial, base=cfg.to_dict(), trials_url=trials_url), {"cpu": 0.01})
    tune_storage, fs = storage.pyarrow_filesystem(storage_path)
    experiment = storage.join(tune_storage, name) if fs is None else f"{tune_storage}/{name}"
    if resume:
        if not tune.Tuner.can_restore(experiment, storage_filesystem=fs):
            raise SweepError(f"no sweep to resume at {sweep_url}: run it once without --resume")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, storage_filesystem=fs, resume_errored=True)
        return tuner.fit(), sweep_url
    searcher = None
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=cfg.train.seed)
    tuner = tune.Tuner(
        trainable,
        param_space=tune_space(space),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode=MODE,
            num_samples=num_samples,
            search_alg=searcher,
            max_concurrent_trials=concurrency(cfg, max_concurrent),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=grace_period),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=tune_storage,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )
    return tuner.fit(), sweep_url


def summarise(results, space: dict, base: Config, sweep_url: str) -> list[dict]:
    """trials.csv, best.yaml and objective.png under the sweep; returns the table rows."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        best = float(df[OBJECTIVE].max()) if df is not None and OBJECTIVE in df else math.nan
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
        params = {k: r.config.get(k) for k in space}
        trial = (r.metrics or {}).get("trial_id") or "_".join(Path(r.path).name.split("_")[2:4])
        rows.append(
            {"trial": trial, **params, OBJECTIVE: best, "epochs": epochs, "status": "error" if r.error else "done"}
        )
    rows.sort(key=lambda row: -row[OBJECTIVE] if not math.isnan(row[OBJECTIVE]) else math.inf)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(storage.join(sweep_url, "trials.csv"), buf.getvalue().encode())
    done = [row for row in rows if not math.isnan(row[OBJECTIVE])]
    if done:
        best = config_from_dict(
            base.to_dict(), "sweep", [*overrides({k: done[0][k] for k in space}), f"train.name={base.train.name}-best"]
        )
        header = (
            f"# Best of the sweep at {sweep_url}: {OBJECTIVE} {done[0][OBJECTIVE]:.4f} "
            f"({done[0]['trial']}). Run: python -m dclr_dist.train --config best.yaml\n"
        )
        storage.write_bytes(
            storage.join(sweep_url, "best.yaml"), (header + yaml.safe_dump(best.to_dict(), sort_keys=False)).encode()
        )
        storage.write_bytes(storage.join(sweep_url, "objective.png"), _plot(done, space))
    return rows


def _plot(rows: list[dict], space: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(space)
    cols = min(4, len(keys))
    fig, axes = plt.subplots(
        math.ceil(len(keys) / cols), cols, figsize=(3.2 * cols, 2.8 * math.ceil(len(keys) / cols)), squeeze=False
    )
    y = [row[OBJECTIVE] for row in rows]
    for ax, key in zip(axes.flat, keys):
        dist, args = space[key]
        if dist == "choice":
            labels = [str(a) for a in args]
            ax.scatter([labels.index(str(row[key])) for row in rows], y)
            ax.set_xticks(range(len(labels)), labels)
        else:
            ax.scatter([row[key] for row in rows], y)
            if dist == "loguniform":
                ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(OBJECTIVE)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"{OBJECTIVE} (best of each trial) against each searched parameter")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def print_table(rows: list[dict], space: dict) -> None:
    cols = ["trial", *space, OBJECTIVE, "epochs", "status"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))


def _sweep_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m dclr_dist.sweep``."""
    p = argparse.ArgumentParser(
        prog="python -m dclr_dist.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        default=str(RECIPES / "demo.yaml"),
        metavar="FILE.yaml",
        help="training config the trials start from, a file or a shipped recipe name (default: the demo recipe)",
    )
    p.add_argument(
        "--space",
        default=str(SPACE),
        metavar="SPACE.yaml",
        help="search space: config key -> {uniform|loguniform|randint|choice: arguments} "
        "(default: the one shipped, dclr_dist/sweep_space.yaml)",
    )
    p.add_argument("--num-samples", type=int, default=8, help="trials to run (default 8)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster fits)")
    p.add_argument(
        "--search",
        choices=("random", "optuna"),
        default="random",
        help="random sampling, or Optuna's TPE (needs `pip install optuna`)",
    )
    p.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial (default 1)")
    p.add_argument("--name", default=None, help="sweep name (default: <train.name>-sweep)")
    p.add_argument(
        "--storage", default=None, help="where the sweep goes, a folder or s3:// (default: train.storage_path)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep; finished trials are kept (needs --trust-storage)",
    )
    p.add_argument(
        "--trust-storage",
        action="store_true",
        help="allow --resume to unpickle Tune's state from the sweep storage: only if nobody you do not trust "
        "can write there (unpickling can run code on this machine)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the training config")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _sweep_parser().parse_args(argv)
    if args.resume and not args.trust_storage:
        print(
            "error: --resume unpickles Tune's experiment state from the sweep's storage, which runs code planted "
            "there by anyone who can write it; add --trust-storage if only you can, or start a new sweep with --name",
            file=sys.stderr,
        )
        return 2
    try:
        base = load_config(args.config, [*args.overrides, "eval.every=1"])
        space = load_space(args.space, base)
    except (ConfigError, SpaceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dclr_dist.launch import make_paths_absolute

    make_paths_absolute(base)  # trials run in working directories of their own
    name = args.name or f"{base.train.name}-sweep"
    storage_path = storage.absolute(args.storage or base.train.storage_path)
    try:
        results, sweep_url = sweep(
            base,
            space,
            name=name,
            storage_path=storage_path,
            num_samples=args.num_samples,
            max_concurrent=args.max_concurrent,
            search=args.search,
            grace_period=args.grace_period,
            resume=args.resume,
        )
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = summarise(results, space, base, sweep_url)
    print_table(rows, space)
    failed = sum(r["status"] == "error" for r in rows)
    print(
        f"{len(rows)} trials ({failed} failed); best config {storage.join(sweep_url, 'best.yaml')}, "
        f"plot {storage.join(sweep_url, 'objective.png')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
