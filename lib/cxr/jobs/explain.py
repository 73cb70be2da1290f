"""Grad-CAM heatmaps for chest X-rays, with a focus score per image (is the model looking at the lungs?).

    python jobs/explain.py --input images/ --model default --output out/explain

Writes heatmaps/*.png (overlays on the image the model saw), explanations.parquet (the score columns
plus focus, corner_share, outside_lungs, heatmap) and gallery.html. Focus = share of the Grad-CAM
mass inside the central lung box (x 15-85%, y 10-85% of the image); uniform = 0.525, < 0.5 flagged.
"""

from __future__ import annotations

import argparse

from .. import cli


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    data = p.add_argument_group("input")
    data.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="URI",
        help="folder (recursive), s3://bucket/prefix, single image, or .parquet/.csv manifest; repeatable",
    )
    data.add_argument(
        "--limit", type=cli.positive_int, help="explain a random subset of this many images (fixed --seed)"
    )
    data.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    data.add_argument(
        "--all-views",
        action="store_true",
        help="also explain lateral and oblique DICOM views (by default error rows 'not a frontal view', as in "
        "score.py)",
    )
    model = p.add_argument_group("model and resources")
    cli.add_model_option(model)
    model.add_argument(
        "--layer",
        help="module name Grad-CAM hooks (default: the backbone's last convolutional block; "
        "an ensemble: each member's own, and its maps averaged)",
    )
    cli.add_batch_size(model, default=16)
    cli.add_actor_options(model)
    cli.add_output_options(p, metavar="URI", help="directory or s3:// prefix (must be empty)")
    cli.add_general_options(p)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    cli.setup_logging(args.verbose)
    from ..explain import explain

    summary = explain(
        args.input,
        args.model,
        args.output,
        limit=args.limit,
        seed=args.seed,
        overwrite=args.overwrite,
        layer=args.layer,
        batch_size=args.batch_size,
        actors=args.actors,
        all_views=args.all_views,
    )
    print(summary.line())
    return cli.OK


def run() -> None:
    """The console command ``cxr-explain``: ``main`` with the jobs' exit codes."""
    cli.run(main)
