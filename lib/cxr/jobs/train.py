"""Fine-tune a CNN backbone on labelled chest X-rays with Ray Train.

    python jobs/train.py --data DATA --backbone mobilenet_v2 --output runs/mnv2

DATA is a folder or s3:// prefix laid out as {train,test}/{covid,non}/ (only train/ is used) or
{covid,non}/. OUTPUT becomes a checkpoint directory that the score and evaluate jobs take as --model.
"""

from __future__ import annotations

import argparse
import json

from .. import cli


def parse_args(argv=None) -> argparse.Namespace:
    """One ``add_argument`` per option, in topic groups: long by nature, not deep."""
    from ..configs import TrainConfig, default_of

    def default(name):
        return default_of(TrainConfig, name)

    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    groups = cli.add_training_options(p, TrainConfig, what="the model")
    data, train = groups["data"], groups["training"]
    data.add_argument(
        "--groups",
        metavar="CSV",
        help="CSV or TSV (local or s3://) with columns file,group: images of one group (a case, a patient) stay on "
        "one side of the split",
    )
    data.add_argument(
        "--holdout-by",
        metavar="COLUMN",
        help="a labelled manifest's column (e.g. source): also train one model per value of it with that value's "
        "images held out (patients never split), score them, and write ROC AUC, sensitivity and specificity per "
        "held-out value and pooled to holdout.csv/.json/.html; one more training per value",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--backbone",
        default=default("backbone"),
        help="mobilenet_v2, mobilenet_v3_large, resnet50, efficientnet_b0, densenet121, or timm/<name>",
    )
    model.add_argument(
        "--weights", default=default("weights"), help="imagenet | none | PATH to a .safetensors/.pth state dict"
    )
    train.add_argument(
        "--epochs",
        type=cli.positive_int,
        default=default("epochs"),
        help="passes over the training images; the checkpoint is the best epoch's",
    )
    train.add_argument(
        "--lr",
        type=cli.positive_float,
        default=default("lr"),
        help="AdamW learning rate, decayed to 0 by a cosine schedule over the epochs",
    )
    train.add_argument(
        "--covid-weight",
        type=cli.positive_float,
        default=default("covid_weight"),
        help="loss weight of the covid class (default: balanced after oversampling)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=default("seed"),
        help="seed of the split, the initialisation, the batch order and the augmentation",
    )
    threshold = p.add_argument_group("threshold and ensembles")
    threshold.add_argument(
        "--target-sensitivity",
        type=cli.fraction,
        default=default("target_sensitivity"),
        help="the threshold keeps validation sensitivity at this",
    )
    threshold.add_argument(
        "--threshold-folds",
        type=cli.positive_int,
        default=default("threshold_folds"),
        metavar="K",
        help="K > 1: also train on the other folds of a K-fold split and choose the threshold on the pooled "
        "out-of-fold scores (all training images, not one small validation split); K times the training time. "
        "With K = 1/--val-fraction (5 for 0.2) the shipped model is one of the K",
    )
    threshold.add_argument(
        "--seeds",
        type=cli.positive_int,
        default=default("seeds"),
        metavar="N",
        help="N > 1: train N models per split that differ only in their seed and write an ensemble checkpoint "
        "(the mean of their probabilities; its threshold chosen on the ensemble's own validation scores, "
        "with --threshold-folds on every fold's ensemble); N times the training and scoring time",
    )
    resources = p.add_argument_group("resources and recovery")
    resources.add_argument(
        "--workers", type=cli.positive_int, default=default("workers"), help="data-parallel Ray Train workers"
    )
    resources.add_argument(
        "--cpus-per-worker",
        type=cli.positive_float,
        default=default("cpus_per_worker"),
        help="logical CPUs each training worker reserves",
    )
    resources.add_argument(
        "--threads-per-worker",
        type=cli.positive_int,
        default=default("threads_per_worker"),
        help="torch threads per worker (default: the node's CPUs // workers)",
    )
    resources.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 mixed precision")
    resources.add_argument(
        "--max-failures",
        type=cli.non_negative_int,
        default=default("max_failures"),
        help="worker failures survived by resuming from the last checkpoint",
    )
    cli.add_output_options(
        p,
        metavar="URI",
        help="checkpoint directory or s3:// prefix to write. The same command again resumes an interrupted run; "
        "an output holding a run with other settings is refused (exit 5) unless --overwrite",
        overwrite_help="delete what the output holds (an earlier run) before training",
    )
    cli.add_general_options(p)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    cli.setup_logging(args.verbose)
    from ..data import read_group_table
    from ..models import check_backbone
    from ..train import TrainConfig, train

    try:
        check_backbone(args.backbone)
        from ..preprocess import PreprocessSpec, parse_crop

        crop = parse_crop(args.crop)
        PreprocessSpec(input_size=args.image_size, crop=crop, equalize=args.equalize)  # validates
    except ValueError as exc:
        raise cli.UsageError(str(exc)) from None
    groups = read_group_table(args.groups, "--groups") if args.groups else None
    cfg = TrainConfig(
        data=args.data,
        output=args.output,
        backbone=args.backbone,
        weights=args.weights,
        epochs=args.epochs,
        lr=args.lr,
        covid_weight=args.covid_weight,
        oversample=args.oversample,
        batch_size=args.batch_size,
        image_size=args.image_size,
        crop=crop,
        equalize=args.equalize,
        tta=args.tta,
        threshold_folds=args.threshold_folds,
        seeds=args.seeds,
        val_fraction=args.val_fraction,
        target_sensitivity=args.target_sensitivity,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        threads_per_worker=args.threads_per_worker,
        gpu=args.gpu,
        seed=args.seed,
        groups=groups,
        label_map=args.label_map,
        balance_by=args.balance_by,
        holdout_by=args.holdout_by,
        max_failures=args.max_failures,
    )
    print_result(train(cfg, overwrite=args.overwrite), cfg)
    return cli.OK


def print_result(result, cfg) -> None:
    """The job's answer on stdout: a line per model and figure, then one JSON line."""
    m = result.metrics
    print(
        f"trained {result.model_id} in {result.seconds:.0f}s: best epoch {result.best_epoch}, validation AUC "
        f"{m['val_auc']:.3f}, "
        f"specificity {m['val_spec_at_target']:.3f} at sensitivity >= {cfg.target_sensitivity} (threshold "
        f"{result.threshold:.4f}) -> {result.output}"
    )
    if result.cross_validation:
        cv = result.cross_validation
        ps, sv = cv["pooled_sensitivity"], cv["shipped_validation"]["specificity"]
        print(
            f"threshold {cv['threshold']:.4f} from {cv['folds']} folds: operating specificity "
            f"{cv['operating_specificity']:.3f} keeps "
            f"{ps['k']}/{ps['n']} out-of-fold COVID images (sensitivity 95% CI "
            f"{ps['ci95'][0]:.3f}-{ps['ci95'][1]:.3f}); "
            f"shipped model's validation specificity {sv['value']:.3f} ({sv['k']}/{sv['n']}); per-fold AUC "
            + ", ".join(f"{f['auc']:.3f}" for f in cv["per_fold"])
        )
    if result.holdout:
        from ..holdout import holdout_line

        print(holdout_line(result.holdout))
    print(
        json.dumps(
            {
                "train": {
                    "model": result.model_id,
                    "output": result.output,
                    "threshold": result.threshold,
                    "best_epoch": result.best_epoch,
                    "seconds": round(result.seconds, 1),
                    "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))},
                    **({"holdout_mean_roc_auc": result.holdout["mean_roc_auc"]} if result.holdout else {}),
                }
            }
        )
    )


def run() -> None:
    """The console command ``cxr-train``: ``main`` with the jobs' exit codes."""
    cli.run(main)
