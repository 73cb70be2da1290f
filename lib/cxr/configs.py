"""The configurations of the training and search jobs, as dataclasses: the library's arguments and the single
source of the jobs' defaults (``cxr.cli`` reads its option defaults from these fields). Light to import: the
command lines read them before anything heavy starts."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from .augment import AugmentConfig
from .preprocess import PreprocessSpec, check_tta

__all__ = [
    "MAINTAIN_OLDER_THAN_DAYS",
    "MAINTAIN_RETAIN_LAST",
    "ORPHANS_OLDER_THAN_HOURS",
    "SearchConfig",
    "TrainConfig",
    "default_of",
]

# Table maintenance (cxr.table.maintain and `jobs/table.py maintain`): snapshots older than this many days expire,
# the newest this many always stay; unreferenced files are orphans once older than this many hours (Iceberg's own
# default: a write still in flight has files its commit does not reference yet).
MAINTAIN_OLDER_THAN_DAYS = 30.0
MAINTAIN_RETAIN_LAST = 10
ORPHANS_OLDER_THAN_HOURS = 72.0


def _backbones() -> list[str]:
    from .models import list_backbones  # imports torch: only when a search is configured

    return list_backbones()


def default_of(config: type, name: str):
    """The default of field ``name`` of the dataclass ``config``."""
    for f in fields(config):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise ValueError(f"{config.__name__}.{name} has no default")
    raise AttributeError(f"{config.__name__} has no field {name!r}")


@dataclass
class TrainConfig:
    data: str
    output: str
    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    epochs: int = 8
    lr: float = 3e-4
    weight_decay: float = 1e-4
    covid_weight: float | None = None  # None: n_non / (n_covid * oversample), i.e. balanced
    oversample: int = 5  # the paper augments 84 COVID images to 420
    batch_size: int = 32
    image_size: int = 224
    crop: tuple[float, float, float, float] | None = None  # PreprocessSpec.crop: (top, bottom, left, right) kept
    equalize: bool = False  # PreprocessSpec.equalize: histogram equalisation instead of the percentile stretch
    tta: str = "none"  # test-time augmentation of the checkpoint ("hflip"), applied in validation too
    val_fraction: float = 0.2
    threshold_folds: int = 1  # > 1: choose the threshold on pooled out-of-fold scores of this many folds
    # > 1: an ensemble of this many models per split (model seeds seed, seed+1, ...), their mean probability
    seeds: int = 1
    target_sensitivity: float = 0.98
    workers: int = 1
    cpus_per_worker: float = 1.0
    threads_per_worker: int | None = None  # default: this node's CPUs // workers
    gpu: bool = False
    seed: int = 0
    groups: dict[str, str] | None = None  # file name -> group (e.g. a COVID case), besides patient ids
    label_map: dict[str, str] | None = None  # a labelled manifest's label values -> covid/non (data.parse_label_map)
    # a manifest column whose every value contributes the same share of each class (data.balance_weights)
    balance_by: str | None = None
    # a manifest column: also train one model per value with that value's rows held out (cxr.holdout)
    holdout_by: str | None = None
    augment: dict = field(default_factory=lambda: AugmentConfig().to_dict())
    max_failures: int = 2


@dataclass
class SearchConfig:
    data: str
    output: str
    backbones: list[str] = field(default_factory=lambda: _backbones())
    num_samples: int = 4  # trials per backbone
    max_concurrent: int | None = None  # default: as many as the cluster's resources hold
    epochs: int = 6
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0  # CPUs of a trial's Ray Train worker (its driver takes DRIVER_CPUS more)
    target_sensitivity: float = 0.98
    image_size: int = 224
    crop: tuple[float, float, float, float] | None = None  # PreprocessSpec.crop for every trial (see train --crop)
    equalize: bool = False
    tta: str = "none"  # test-time augmentation of every trial's model (preprocess.TTA_CHOICES)
    weights: str = "imagenet"  # imagenet | none | auto (ImageNet where the weights are available offline, else none)
    lr_range: tuple[float, float] = (1e-4, 3e-3)
    covid_weight_range: tuple[float, float] = (0.5, 2.0)  # multiples of the balanced class weight
    oversample: int = 5
    batch_size: int = 32
    val_fraction: float = 0.2
    label_map: dict[str, str] | None = None  # a labelled manifest's label values -> covid/non (data.parse_label_map)
    balance_by: str | None = None  # TrainConfig.balance_by for every trial
    holdout_by: str | None = None  # rank trials by their mean held-out ROC AUC over this column's values
    seed: int = 0
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 2
    max_failures: int = 1  # Ray Train worker failures survived inside a trial
    trial_max_failures: int = 1  # Tune: restarts of a failed trial (its Train run resumes from its last epoch)

    def check(self) -> None:
        from .models import check_backbone

        if not self.backbones:
            raise ValueError("no backbones to search")
        for b in self.backbones:
            check_backbone(b)
        if self.weights not in ("imagenet", "none", "auto"):
            raise ValueError(f"--weights must be imagenet, none or auto, not {self.weights!r}")
        if len(set(self.backbones)) != len(self.backbones):
            raise ValueError("a backbone is named twice")
        if self.num_samples < 1 or self.epochs < 1:
            raise ValueError("--num-samples and --epochs must be at least 1")
        if not 0 < self.target_sensitivity <= 1:
            raise ValueError("--target-sensitivity must be in (0, 1]")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ValueError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
        for lo, hi in (self.lr_range, self.covid_weight_range):
            if not 0 < lo <= hi:
                raise ValueError(f"bad range ({lo}, {hi}): need 0 < low <= high")
        PreprocessSpec(input_size=self.image_size, crop=self.crop, equalize=self.equalize)  # raises on a bad crop
        check_tta(self.tta)
