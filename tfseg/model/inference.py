"""What inference runs: the average of one or more models' outputs over the scans and their flips,
and each member of an export as a function of a whole volume.

Flip test-time augmentation (`hflip`: left-right, `vflip`: up-down) predicts the flipped scans too and
flips the probabilities back before averaging; an ensemble averages its members the same way, with
their weights. One function, so evaluate and the exported SavedModel compute the same average. A flip
is only asked of a model trained with it (check_tta): the organs lie on fixed sides of the body, so a
mirrored abdomen is anatomy a model trained without flips never saw.

An export's volume signatures see every member as one function, volume -> probabilities at its model
size (member_probabilities): a 2.5D model builds its K-slice contexts from the volume; another
model.kind plugs in there with its own branch (a 3D model: its sliding window).
"""

import dataclasses
import math
import sys

import keras
import tensorflow as tf
from keras import ops

from tfseg.errors import ConfigError
from tfseg.model.sliding_window import sliding_window_probabilities
from tfseg.model.unet import split_outputs
from tfseg.model.unet3d import slice_presence

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


def averaged(models: list[keras.Model], tta=(), weights=None):
    """A function scans [B, h, w, K] -> (probabilities float32 [B, h, w, 3], presence [B, 3] or None): the
    mean over every model and every view (the scans as they are, and each flip in `tta`), each model's
    views weighted by its entry of `weights` (default: equal). Presence is averaged when every model has a
    presence head, else None."""
    views = (None, *parse_tta(tta))
    weights = member_weights(weights, len(models))

    def mean(values, model_weights):
        if len(values) == 1:
            return values[0]
        return ops.sum(ops.stack(values) * ops.reshape(model_weights, (-1, *[1] * len(values[0].shape))), axis=0)

    def call(scans):
        probabilities, presences, view_weights = [], [], []
        for model, weight in zip(models, weights, strict=True):
            for view in views:
                x = scans if view is None else ops.flip(scans, axis=TTA_MODES[view])
                probs, presence = split_outputs(model(x, training=False))
                probs = ops.cast(probs, "float32")
                probabilities.append(probs if view is None else ops.flip(probs, axis=TTA_MODES[view]))
                presences.append(presence)
                view_weights.append(weight / len(views))
        view_weights = ops.convert_to_tensor(view_weights, "float32")
        mean_probs = mean(probabilities, view_weights)
        if any(p is None for p in presences):
            return mean_probs, None
        return mean_probs, mean([ops.cast(p, "float32") for p in presences], view_weights)

    return call


def member_weights(weights, count: int) -> list[float]:
    """Member weights summing to 1 (default: equal); ConfigError unless one positive number per member."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ConfigError(f"weights {weights}: expected {count} positive number(s), one per member")
    return [w / sum(weights) for w in weights]


def chunked(predict, count, chunk: int, size, num_classes: int, with_presence: bool):
    """predict(start, stop) -> (probabilities [stop - start, h, w, C], presence [stop - start, C] or
    None) over items 0..count, `chunk` at a time in a tf.while_loop: a whole volume needs no more
    memory than a batch. Returns (probabilities [count, h, w, C], presence [count, C] or None)."""
    steps = (count + chunk - 1) // chunk
    empty = tf.TensorArray(tf.float32, size=steps, infer_shape=False)

    def step(i, probabilities, presences):
        probs, presence = predict(i * chunk, tf.minimum((i + 1) * chunk, count))
        presences = presences.write(i, tf.cast(presence, tf.float32)) if with_presence else presences
        return i + 1, probabilities.write(i, tf.cast(probs, tf.float32)), presences

    _, probabilities, presences = tf.while_loop(lambda i, *_: i < steps, step, (tf.constant(0), empty, empty),
                                                parallel_iterations=1)
    probabilities = tf.ensure_shape(probabilities.concat(), [None, *size, num_classes])
    return probabilities, tf.ensure_shape(presences.concat(), [None, num_classes]) if with_presence else None


# ---- members of an export: each turns a whole volume into probabilities ----------------------------

def model_kind(config) -> str:
    """The run's model.kind: 2.5d (K context slices per 2D prediction, today's models) unless it says."""
    return str(getattr(config.model, "kind", "2.5d")).lower()


SUPPORTED_KINDS = ("2.5d", "3d")


def check_kind(config, name: str) -> None:
    """ConfigError naming the member unless member_probabilities knows its model.kind."""
    kind = model_kind(config)
    if kind not in SUPPORTED_KINDS:
        raise ConfigError(f"{name}: model.kind {kind} is not supported by this export yet (it serves "
                          f"{', '.join(SUPPORTED_KINDS)} members); export the other members without it")


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of an export: its float32 Keras model, its config (input and model.kind), its weight in
    the fusion, and a name for messages."""

    model: keras.Model
    config: object
    weight: float = 1.0
    name: str = "member"

    @property
    def has_presence(self) -> bool:
        """Whether the member gives a per-slice presence: a 2.5D presence head, or a 3D model's highest
        probability on each slice (unet3d.slice_presence), so that a fusion can gate empty slices."""
        return model_kind(self.config) == "3d" or isinstance(self.model.output, dict)


def member_probabilities(member: Member, tta=(), chunk: int = 16, num_classes: int = 3):
    """The member's function volume float32 [D, h, w, 1] (normalised over the volume, resized to its
    data.image_size) -> (probabilities float32 [D, h, w, C] at its model size, presence [D, C] or None),
    `chunk` slices (2.5D) or train.window_batch windows (3D) at a time. One branch per model.kind; a 3D
    model's presence is its highest probability on each slice, which a fusion averages with the 2.5D
    members' presence heads to gate slices."""
    check_kind(member.config, member.name)
    kind = model_kind(member.config)
    if kind == "2.5d":
        return context_probabilities(averaged([member.model], tta), member.config.data.offsets, chunk,
                                     num_classes, member.has_presence)
    if kind == "3d":
        t = member.config.train
        windows = averaged_volume([member.model], member.config.data.patch_size, tta=tta,
                                  overlap=t.window_overlap, window_batch=t.window_batch)

        def call(volume):
            probabilities = windows(volume)
            return probabilities, slice_presence(probabilities)

        return call
    raise AssertionError(kind)  # check_kind refused it


def context_probabilities(predict, offsets, chunk: int, num_classes: int, with_presence: bool):
    """2.5D: slice i's input is slices i + offsets, clamped to the volume's ends (as
    tfseg.data.context.context_stack builds them in training), built `chunk` slices at a time."""
    num_context, offsets = len(offsets), tf.constant(list(offsets), tf.int32)

    def call(volume):
        slices = volume[..., 0]
        depth = tf.shape(slices)[0]

        def window(start, stop):
            index = tf.clip_by_value(tf.range(start, stop)[:, None] + offsets[None, :], 0, depth - 1)
            scans = tf.ensure_shape(tf.transpose(tf.gather(slices, index), [0, 2, 3, 1]),
                                    [None, *volume.shape[1:3], num_context])
            return predict(scans)

        return chunked(window, depth, chunk, volume.shape[1:3], num_classes, with_presence)

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
