"""What inference runs: the average of one or more models' outputs over the scans and their flips.

Flip test-time augmentation (`hflip`: left-right, `vflip`: up-down) predicts the flipped scans too and
flips the probabilities back before averaging; an ensemble averages its members the same way. One
function, so evaluate and the exported SavedModel compute the same average. A flip is only asked of a
model trained with it (check_tta): the organs lie on fixed sides of the body, so a mirrored abdomen is
anatomy a model trained without flips never saw.
"""

import sys

import keras
from keras import ops

from tfseg.errors import ConfigError
from tfseg.model.sliding_window import sliding_window_probabilities
from tfseg.model.unet import split_outputs

TTA_MODES = {"hflip": -2, "vflip": -3}  # the axis each flips, of [B, H, W, C] and of [B, D, H, W, C]


def parse_tta(spec) -> tuple[str, ...]:
    """'hflip,vflip' (or a list) -> ('hflip', 'vflip'); '' or None -> ()."""
    modes = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec or ()) if m.strip()]
    for mode in modes:
        if mode not in TTA_MODES:
            raise ConfigError(f"tta: unknown mode {mode!r} (choose from {', '.join(TTA_MODES)})")
    return tuple(dict.fromkeys(modes))


FLIP_SETTINGS = {"hflip": "augment.flip_horizontal", "vflip": "augment.flip_vertical"}


def trained_flips(config) -> list[str]:
    """The flip TTA modes a run's training augmentation showed its model (augment.enabled and the flip on)."""
    augment = config.augment
    return [mode for mode, key in FLIP_SETTINGS.items()
            if augment.enabled and getattr(augment, key.split(".", 1)[1])]


def check_tta(tta, members, *, allow_untrained: bool = False, warn: bool = True) -> tuple[str, ...]:
    """parse_tta(tta) after checking that every member, (name, config) pairs, was trained with each flip
    asked for. Otherwise ConfigError naming the member and the setting, unless allow_untrained: then a
    warning on stderr (warn=False: no warning, for a check that a later one repeats)."""
    modes = parse_tta(tta)
    problems = []
    for name, config in members:
        for mode in modes:
            if mode not in trained_flips(config):
                setting = FLIP_SETTINGS[mode] if config.augment.enabled else "augment.enabled"
                problems.append(f"{name} was not trained with {mode} ({setting} is false)")
    if problems and not allow_untrained:
        raise ConfigError(f"tta: {'; '.join(problems)}. Its predictions on flipped scans would be averaged in, "
                          "though a mirrored abdomen is anatomy it never saw: drop the mode, train with the "
                          "flip, or pass --allow-untrained-tta")
    if problems and warn:
        print(f"WARNING: --allow-untrained-tta: {'; '.join(problems)}. Averaging in its predictions on flipped "
              "scans (anatomy it never saw) may lower the score.", file=sys.stderr)
    return modes


def averaged(models: list[keras.Model], tta=()):
    """A function scans [B, h, w, K] -> (probabilities float32 [B, h, w, 3], presence [B, 3] or None): the
    mean over every model and every view (the scans as they are, and each flip in `tta`). Presence is
    averaged when every model has a presence head, else None."""
    views = (None, *parse_tta(tta))

    def call(scans):
        probabilities, presences = [], []
        for model in models:
            for view in views:
                x = scans if view is None else ops.flip(scans, axis=TTA_MODES[view])
                probs, presence = split_outputs(model(x, training=False))
                probs = ops.cast(probs, "float32")
                probabilities.append(probs if view is None else ops.flip(probs, axis=TTA_MODES[view]))
                presences.append(presence)
        mean_probs = probabilities[0] if len(probabilities) == 1 else ops.mean(ops.stack(probabilities), axis=0)
        if any(p is None for p in presences):
            return mean_probs, None
        stacked = [ops.cast(p, "float32") for p in presences]
        return mean_probs, stacked[0] if len(stacked) == 1 else ops.mean(ops.stack(stacked), axis=0)

    return call


def averaged_volume(models: list[keras.Model], patch_size, *, tta=(), overlap: float = 0.5, window_batch: int = 4):
    """For 3D models: a function volume float32 [D, h, w, 1] -> probabilities float32 [D, h, w, 3], the mean of
    every model and view (`averaged`) over Gaussian-weighted sliding windows of patch_size (data.patch_size),
    overlapping by `overlap` (train.window_overlap), window_batch windows per call (train.window_batch)."""
    call = averaged(models, tta)

    def volume_probabilities(volume):
        return sliding_window_probabilities(lambda windows: call(windows)[0], volume, patch_size, overlap=overlap,
                                            window_batch=window_batch)

    return volume_probabilities
