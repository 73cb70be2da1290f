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
    from ..models import list_backbones
    from ..preprocess import TTA_CHOICES

    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument(
        "--data",
        required=True,
        metavar="URI",
        help="labelled images: a folder or s3:// prefix with {train,test}/{covid,non}/ (only train/ is used) or "
        "{covid,non}/",
    )
    p.add_argument(
        "--output", required=True, metavar="URI", help="folder or s3:// prefix for the search and its exports"
    )
    p.add_argument("--backbones", default=",".join(list_backbones()), help="comma-separated")
    p.add_argument(
        "--num-samples",
        type=cli.positive_int,
        default=4,
        help="trials per backbone (learning rate and class weight drawn at random)",
    )
    p.add_argument(
        "--max-concurrent", type=cli.positive_int, help="trials at a time (default: as many as the cluster holds)"
    )
    p.add_argument(
        "--epochs", type=cli.positive_int, default=6, help="epochs per trial (ASHA stops weak trials earlier)"
    )
    p.add_argument(
        "--gpus-per-trial", type=cli.non_negative_float, default=0.0, help="GPUs of each trial's training worker"
    )
    p.add_argument(
        "--cpus-per-trial",
        type=cli.positive_float,
        default=1.0,
        help="CPUs of each trial's training worker (fractions allowed)",
    )
    p.add_argument(
        "--target-sensitivity",
        type=cli.fraction,
        default=0.98,
        help="models are ranked by validation specificity at this sensitivity",
    )
    p.add_argument("--image-size", type=cli.positive_int, default=224, help="the models' input, in pixels (square)")
    p.add_argument(
        "--crop",
        default="none",
        metavar="lung|none|T,B,L,R",
        help="keep only this box of each image (see train.py --crop)",
    )
    p.add_argument(
        "--equalize",
        action="store_true",
        help="histogram equalisation instead of the percentile stretch (see train.py)",
    )
    p.add_argument(
        "--tta",
        choices=TTA_CHOICES,
        default="none",
        help="test-time augmentation of every trial's model (see train.py --tta)",
    )
    p.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet | none | auto (ImageNet where its weights are available offline, else from scratch)",
    )
    p.add_argument(
        "--lr-range",
        type=cli.positive_float,
        nargs=2,
        default=(1e-4, 3e-3),
        metavar=("LOW", "HIGH"),
        help="log-uniform learning rate",
    )
    p.add_argument(
        "--covid-weight-range",
        type=cli.positive_float,
        nargs=2,
        default=(0.5, 2.0),
        metavar=("LOW", "HIGH"),
        help="log-uniform COVID class weight, as a multiple of the balanced weight",
    )
    p.add_argument(
        "--oversample",
        type=cli.positive_int,
        default=5,
        help="repeat each COVID training image this often (see train.py)",
    )
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="images per training step")
    p.add_argument(
        "--val-fraction",
        type=cli.val_fraction,
        default=0.2,
        help="share of the images (patient-grouped) held out for validation",
    )
    p.add_argument(
        "--grace-period", type=cli.positive_int, default=1, help="ASHA: epochs before a trial can be stopped"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the search")
    p.add_argument("--verbose", action="store_true", help="debug logging")
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
