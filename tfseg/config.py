"""Typed configuration: defaults, then a YAML file, then `section.key=value` overrides, validated.

Experiments are YAML files in configs/ (Model Garden style); the resolved config is written to the
run folder so a run can be repeated or resumed exactly.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tfseg import files
from tfseg.errors import ConfigError


@dataclass
class DataConfig:
    records: str = "records/synth"  # make_records output folder
    val_folds: tuple[int, ...] = (0,)  # the rest of the folds train, except holdout_folds
    holdout_folds: tuple[int, ...] = ()  # neither trained nor validated on: a test set for ensembles
    image_size: tuple[int, int] = (320, 320)  # (height, width) fed to the model
    offsets: tuple[int, ...] = (-2, 0, 2)  # 2.5D context: channel i is slice s + offsets[i]
    resize: str = "resize"  # resize | pad_crop
    interpolation: str = "bilinear"  # scans: bilinear | area (masks always nearest)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # per-volume intensity clip before [0, 1]
    keep_empty: float = 1.0  # share of organ-free training slices kept
    shuffle_buffer: int = 1024  # slices
    batch_size: int = 16  # global batch size (all replicas)
    deterministic: bool = False  # fixed order and seeds: same batches every run
    cache: str = "none"  # none | memory: keep the decoded, resized volumes in RAM after the first epoch
    seed: int = 0
    # model.kind 3d only: training patches [D, H, W] cut from the resized volumes (H, W at most image_size)
    patch_size: tuple[int, int, int] | None = None
    foreground_fraction: float = 0.33  # 3d: share of patches centred on a random voxel of a present organ
    patches_per_volume: int = 4  # 3d: patches cut from each volume read (one decode, several patches)


@dataclass
class AugmentConfig:
    enabled: bool = True
    device: str = "host"  # host | accelerator: geometry and dropout in the input pipeline or in the train step
    flip_horizontal: bool = False  # off: the organs lie on fixed sides of the body (stomach on the left)
    flip_vertical: bool = False
    rotation_degrees: float = 15.0
    scale: float = 0.1  # zoom in/out by up to this fraction
    shift: float = 0.0625  # translate by up to this fraction of the size
    grid_distortion: float = 0.0  # max displacement of a coarse grid, fraction of the size (0: off)
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: float = 0.2  # gamma drawn from [1 - g, 1 + g]
    noise_std: float = 0.02
    dropout_holes: int = 0  # coarse dropout rectangles on the scan only
    dropout_size: float = 0.1  # side of a hole, fraction of the image size


@dataclass
class ModelConfig:
    kind: str = "2.5d"  # 2.5d: a 2D UNet on stacked context slices | 3d: a 3D UNet on patches (data.patch_size)
    depth: int = 4
    base_filters: int = 32
    block: str = "residual"  # plain | residual
    norm: str = "batch"  # batch | group | none
    dropout: float = 0.0
    upsample: str = "transpose"  # transpose | resize
    encoder: str | None = None  # null, or a keras.applications backbone (CHOICES lists them)
    encoder_weights: str | None = None  # null | imagenet (needs a download) | a local .h5 / .weights.h5 file
    presence_head: bool = False  # a per-class "organ on this slice" output, for empty-slice gating
    coord_channels: bool = False  # append each pixel's row and column to the scans (built-in encoder)
    z_pools: int = 2  # 3d: how many of the deepest stages also pool along z (the others pool in-plane only)


@dataclass
class LossConfig:
    name: str = "bce_dice"  # bce_dice | tversky | focal | focal_dice (focal in place of BCE, + Dice)
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    batch_dice: bool = False  # bce_dice: Dice over the whole batch, not per slice (see losses.BceDiceLoss)
    presence_weight: float = 0.2  # with model.presence_head: weight of its BCE in the loss
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25


@dataclass
class TrainConfig:
    epochs: int = 30  # with budget_minutes: how many times the run validates and checkpoints
    steps_per_epoch: int | None = None  # None: one pass over the training slices (or what the budget allows)
    budget_minutes: float | None = None  # train for this long, validation included (training.budget)
    optimizer: str = "adamw"  # adamw | adam
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine decay ends at learning_rate * min_lr_ratio
    clip_norm: float = 1.0  # global gradient norm clipping (0: off)
    ema: float = 0.0  # > 0: keep an exponential moving average of the weights with this momentum; the
                      # run's model gets the averaged weights at the end
    threshold: float = 0.5  # probability -> mask
    strategy: str = "auto"  # auto | default | one_device | mirrored | multiworker | tpu
    precision: str = "auto"  # auto | float32 | mixed_float16 | mixed_bfloat16 (auto: training.strategy)
    cpu_replicas: int = 0  # >0: split the CPU into this many logical devices (tests, mirrored)
    jit_compile: bool | str = False  # true | false | auto (XLA where it pays off: training.strategy)
    tpu: str | None = None
    image_log_every: int = 5  # epochs between validation images in TensorBoard (0: never)
    profile_batches: str | None = None  # e.g. "10,20": capture a TensorBoard profile
    min_component: int = 0  # evaluate: drop predicted components smaller than this (pixels per slice)
    min_component_fraction: float = 0.0  # evaluate, predict: drop 3D components under this x the largest
    presence_threshold: float = 0.5  # with model.presence_head: zero a class on slices below this presence
    min_pixels: int = 0  # pixel rule (0: off): zero a class on a slice unless more than this many pixels ...
    min_pixel_probability: float = 0.5  # ... have at least this probability
    window_overlap: float = 0.5  # 3d inference: overlap of the sliding windows (share of the patch)
    window_batch: int = 4  # 3d inference: windows per model call (bounds the memory, not the result)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "data.resize": ("resize", "pad_crop"),
    "data.interpolation": ("bilinear", "area"),
    "data.cache": ("none", "memory"),
    "augment.device": ("host", "accelerator"),
    "model.kind": ("2.5d", "3d"),
    "model.block": ("plain", "residual"),
    "model.norm": ("auto", "batch", "sync_batch", "group", "none"),
    "model.upsample": ("transpose", "resize"),
    "model.encoder": (None, "efficientnetv2b0", "efficientnetv2s", "efficientnetv2m", "efficientnetv2l",
                      "efficientnetb4", "efficientnetb5", "efficientnetb6", "efficientnetb7", "resnet50",
                      "convnext_tiny", "convnext_small", "convnext_base"),
    "loss.name": ("bce_dice", "tversky", "focal", "focal_dice"),
    "train.optimizer": ("adamw", "adam"),
    "train.strategy": ("auto", "default", "one_device", "mirrored", "multiworker", "tpu"),
    "train.precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    "train.jit_compile": (True, False, "auto"),
}


def _coerce(value, hint, where: str):
    """Check (and gently convert) one value against its dataclass type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for hint in inner[:-1]:  # the first type that takes the value (bool | str: true, false or a word)
            try:
                return _coerce(value, hint, where)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        inner = args[0]
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint} at {where}")


def _set(config: Config, dotted: str, value, source: str) -> None:
    section_name, _, key = dotted.partition(".")
    sections = {f.name for f in dataclasses.fields(Config)}
    if section_name not in sections or not key:
        raise ConfigError(f"{source}: unknown config section {section_name!r} in {dotted!r} "
                          f"(sections: {', '.join(sorted(sections))})")
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(f"{source}: unknown config key {dotted!r} (keys of {section_name}: "
                          f"{', '.join(hints)})")
    setattr(section, key, _coerce(value, hints[key], f"{source}: {dotted}"))


def validate(config: Config) -> Config:
    """Value checks beyond types; raises ConfigError naming the key."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(map(str, allowed))}")
    d, t = config.data, config.train
    checks = [
        (all(s >= 32 for s in d.image_size), "data.image_size", "sizes must be at least 32"),
        (config.model.kind == "3d" or all(s % (2 ** config.model.depth) == 0 for s in d.image_size),
         "data.image_size", f"sizes must be divisible by 2**model.depth = {2 ** config.model.depth}"),
        (len(d.offsets) >= 1 and len(set(d.offsets)) == len(d.offsets), "data.offsets",
         "needs at least one offset and no repeats"),
        (0 <= d.clip_percentiles[0] < d.clip_percentiles[1] <= 100, "data.clip_percentiles",
         "needs 0 <= low < high <= 100"),
        (0 < d.keep_empty <= 1, "data.keep_empty", "must be in (0, 1]"),
        (d.batch_size >= 1, "data.batch_size", "must be >= 1"),
        (d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1"),
        (config.model.depth >= 1 and config.model.base_filters >= 1, "model.depth", "depth and filters >= 1"),
        (0 <= config.model.dropout < 1, "model.dropout", "must be in [0, 1)"),
        (config.model.encoder_weights in (None, "imagenet") or config.model.encoder_weights.endswith(".h5"),
         "model.encoder_weights", "must be null, imagenet or the path of a .h5 / .weights.h5 file"),
        (t.epochs >= 1, "train.epochs", "must be >= 1"),
        (t.steps_per_epoch is None or t.steps_per_epoch >= 1, "train.steps_per_epoch", "must be >= 1 or null"),
        (t.budget_minutes is None or t.budget_minutes > 0, "train.budget_minutes", "must be > 0 or null"),
        (t.learning_rate > 0, "train.learning_rate", "must be > 0"),
        (t.weight_decay >= 0, "train.weight_decay", "must be >= 0"),
        (0 <= t.ema < 1, "train.ema", "must be in [0, 1) (0: off)"),
        (0 < t.threshold < 1, "train.threshold", "must be in (0, 1)"),
        (0 <= t.min_component_fraction <= 1, "train.min_component_fraction", "must be in [0, 1]"),
        (0 <= t.presence_threshold < 1, "train.presence_threshold", "must be in [0, 1)"),
        (t.min_pixels >= 0, "train.min_pixels", "must be >= 0"),
        (0 <= t.min_pixel_probability < 1, "train.min_pixel_probability", "must be in [0, 1)"),
        (config.loss.presence_weight >= 0, "loss.presence_weight", "must be >= 0"),
        (t.cpu_replicas >= 0, "train.cpu_replicas", "must be >= 0"),
        (0 <= t.window_overlap < 1, "train.window_overlap", "must be in [0, 1)"),
        (t.window_batch >= 1, "train.window_batch", "must be >= 1"),
        (0 <= d.foreground_fraction <= 1, "data.foreground_fraction", "must be in [0, 1]"),
        (d.patches_per_volume >= 1, "data.patches_per_volume", "must be >= 1"),
    ]
    checks += _checks_3d(config) if config.model.kind == "3d" else [
        (d.patch_size is None, "data.patch_size", "is for model.kind 3d only; set it to null")]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    return config


def _checks_3d(config: Config) -> list[tuple[bool, str, str]]:
    """What model.kind 3d needs, and the 2.5D settings it refuses (each check names its key)."""
    d, m = config.data, config.model
    if d.patch_size is None:
        return [(False, "data.patch_size", "model.kind 3d needs the training patch size [D, H, W]")]
    depth, height, width = d.patch_size
    z_factor, xy_factor = 2 ** m.z_pools, 2 ** m.depth
    not_3d = "is not supported with model.kind 3d"
    return [
        (0 <= m.z_pools <= m.depth, "model.z_pools", f"must be in 0..model.depth ({m.depth})"),
        (depth >= 1 and depth % z_factor == 0, "data.patch_size",
         f"D = {depth} must be a positive multiple of 2**model.z_pools = {z_factor}"),
        (all(s >= 1 and s % xy_factor == 0 for s in (height, width)), "data.patch_size",
         f"H and W must be positive multiples of 2**model.depth = {xy_factor}"),
        (height <= d.image_size[0] and width <= d.image_size[1], "data.patch_size",
         f"H, W = {height}, {width} must fit in data.image_size {list(d.image_size)} (patches are cut after the "
         "in-plane resize)"),
        (m.encoder is None, "model.encoder", f"{m.encoder!r} {not_3d} (keras.applications encoders are 2D)"),
        (m.encoder_weights is None, "model.encoder_weights", not_3d),
        (not m.presence_head, "model.presence_head", f"{not_3d}: per-slice presence is the max of the slice's "
         "probabilities (tfseg.model.unet3d.slice_presence)"),
        (not m.coord_channels, "model.coord_channels", not_3d),
        (tuple(d.offsets) == DataConfig().offsets, "data.offsets",
         f"{not_3d}: a 3D model sees its neighbours in the patch; leave the default {list(DataConfig().offsets)}"),
        (d.keep_empty == 1, "data.keep_empty", f"{not_3d}: 3D patches are sampled with data.foreground_fraction"),
    ]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then `section.key=value` overrides; validated."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        for section, values in loaded.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping of keys")
            for key, value in values.items():
                _set(config, f"{section}.{key}", value, str(path))
    for item in overrides:
        dotted, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set(config, dotted.strip(), yaml.safe_load(text) if text.strip() else None, "--set")
    return validate(config)


def to_dict(config: Config) -> dict:
    return {section: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
            for section, values in dataclasses.asdict(config).items()}


def save_config(config: Config, path: str | Path) -> None:
    files.write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
