"""Search learning rate and COVID class weight for several backbones in parallel with Ray Tune, then calibrate and
export the best model per backbone, an ensemble of them, and a leaderboard.

    python jobs/tune.py --data DATA --output runs/search

DATA is a folder or s3:// prefix laid out as {train,test}/{covid,non}/ (only train/ is used) or {covid,non}/.
OUTPUT (local or s3://) receives leaderboard.csv/.png, models/<backbone>/, ensemble/ (each usable as --model by
the score and evaluate jobs) and the Ray Tune experiment; run the same command again to resume an interrupted search.
"""

from __future__ import annotations

import argparse
import json

from .. import cli


def parse_args(argv=None) -> argparse.Namespace:
    """One ``add_argument`` per option, in topic groups: long by nature, not deep."""
    from ..configs import SearchConfig, default_of

    def default(name):
        return default_of(SearchConfig, name)

    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    groups = cli.add_training_options(p, SearchConfig, what="every trial's model")
    train = groups["training"]
    search = p.add_argument_group("search")
    search.add_argument("--backbones", default=",".join(default("backbones")), help="comma-separated")
    search.add_argument(
        "--weights",
        default=default("weights"),
        help="imagenet | none | auto (ImageNet where its weights are available offline, else from scratch)",
    )
    search.add_argument(
        "--num-samples",
        type=cli.positive_int,
        default=default("num_samples"),
        help="trials per backbone (learning rate and class weight drawn at random)",
    )
    search.add_argument(
        "--lr-range",
        type=cli.positive_float,
        nargs=2,
        default=default("lr_range"),
        metavar=("LOW", "HIGH"),
        help="log-uniform learning rate",
    )
    search.add_argument(
        "--covid-weight-range",
        type=cli.positive_float,
        nargs=2,
        default=default("covid_weight_range"),
        metavar=("LOW", "HIGH"),
        help="log-uniform COVID class weight, as a multiple of the balanced weight",
    )
    search.add_argument(
        "--holdout-by",
        metavar="COLUMN",
        help="a labelled manifest's column (e.g. source): every trial also trains once per value of it with that "
        "value's images held out, and the trials are ranked by the mean ROC AUC inside the held-out values "
        "(not by the pooled validation split, which rewards recognising the source); no early stopping; one "
        "more training per value and trial",
    )
    search.add_argument(
        "--target-sensitivity",
        type=cli.fraction,
        default=default("target_sensitivity"),
        help="models are ranked by validation specificity at this sensitivity",
    )
    search.add_argument(
        "--grace-period",
        type=cli.positive_int,
        default=default("grace_period"),
        help="ASHA: epochs before a trial can be stopped",
    )
    search.add_argument("--seed", type=int, default=default("seed"), help="seed of the split and of the search")
    train.add_argument(
        "--epochs",
        type=cli.positive_int,
        default=default("epochs"),
        help="epochs per trial (ASHA stops weak trials earlier)",
    )
    resources = p.add_argument_group("resources")
    resources.add_argument(
        "--max-concurrent",
        type=cli.positive_int,
        default=default("max_concurrent"),
        help="trials at a time (default: as many as the cluster holds)",
    )
    resources.add_argument(
        "--gpus-per-trial",
        type=cli.non_negative_float,
        default=default("gpus_per_trial"),
        help="GPUs of each trial's training worker",
    )
    resources.add_argument(
        "--cpus-per-trial",
        type=cli.positive_float,
        default=default("cpus_per_trial"),
        help="CPUs of each trial's training worker (fractions allowed)",
    )
    cli.add_output_options(
        p,
        metavar="URI",
        help="folder or s3:// prefix for the search and its exports",
        overwrite_help=None,
    )
    cli.add_general_options(p)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    cli.setup_logging(args.verbose)
    from ..preprocess import parse_crop
    from ..tune import SearchConfig, run_search

    try:
        crop = parse_crop(args.crop)
    except ValueError as exc:
        raise cli.UsageError(str(exc)) from None
    cfg = SearchConfig(
        data=args.data,
        output=args.output,
        backbones=[b.strip() for b in args.backbones.split(",") if b.strip()],
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        epochs=args.epochs,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial,
        target_sensitivity=args.target_sensitivity,
        image_size=args.image_size,
        crop=crop,
        equalize=args.equalize,
        tta=args.tta,
        weights=args.weights,
        lr_range=tuple(args.lr_range),
        covid_weight_range=tuple(args.covid_weight_range),
        oversample=args.oversample,
        batch_size=args.batch_size,
        val_fraction=args.val_fraction,
        label_map=args.label_map,
        balance_by=args.balance_by,
        holdout_by=args.holdout_by,
        grace_period=args.grace_period,
        seed=args.seed,
    )
    try:
        cfg.check()
    except ValueError as exc:
        raise cli.UsageError(str(exc)) from None
    result = run_search(cfg)
    print(
        f"{'resumed' if result.resumed else 'ran'} {result.trials} trials ({result.errors} failed, "
        f"{result.unfinished} unfinished) in {result.seconds:.0f}s -> {result.output}"
    )
    for name, m in result.models.items():  # the exported checkpoints' own (calibrated) validation figures
        if m.get("exported_to"):
            nothing = "  LEARNED NOTHING (left out of the ensemble)" if m.get("separates") is False else ""
            auc, spec = (float("nan") if m.get(k) is None else m[k] for k in ("val_auc", "val_spec_at_target"))
            print(
                f"  {name:<20} validation AUC {auc:.3f}  specificity {spec:.3f} "
                f"at sensitivity >= {cfg.target_sensitivity}  -> {m['exported_to']}{nothing}"
            )
    print(
        json.dumps(
            {
                "tune": {
                    "output": result.output,
                    "trials": result.trials,
                    "errors": result.errors,
                    "unfinished": result.unfinished,
                    "seconds": round(result.seconds, 1),
                    "models": result.exported,
                    "ensemble": result.ensemble,
                }
            }
        )
    )
    if result.errors:
        raise cli.JobFailed(
            f"{result.errors} of {result.trials} trials failed (see the leaderboard's error column and the "
            "log); "
            f"{'the other trials were exported' if result.exported else 'nothing was exported'}. "
            "Run the same command again to restart the failed trials from their last checkpoints.",
        )
    return cli.OK if result.exported else cli.FAILED


def run() -> None:
    """The console command ``cxr-tune``: ``main`` with the jobs' exit codes."""
    cli.run(main)
