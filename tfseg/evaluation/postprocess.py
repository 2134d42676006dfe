"""Probabilities -> the masks tfseg reports: the threshold, then dropping stray pieces (small components
per slice, then small 3D components). One implementation for evaluate, predict and the serving graph.

A model's false positives are often small islands far from the organ. One island costs little Dice but
sets the Hausdorff distance, which is 60% of the competition score, so removing them pays.
"""

import dataclasses

import cv2
import numpy as np
from scipy import ndimage

from tfseg.config import TrainConfig
from tfseg.errors import DataError


@dataclasses.dataclass(frozen=True)
class Postprocess:
    """The post-processing settings of a model (train.* keys of its config; tfseg.json of an export).

    Per slice and class: the threshold, then gating (zero the class on the slice when the presence
    head says it is absent, or when no more than min_pixels pixels reach min_pixel_probability); per
    volume: dropping small components per slice, then small 3D components.
    """

    threshold: float = 0.5
    presence_threshold: float = 0.5  # used when the model has a presence head
    min_pixels: int = 0  # pixel rule, 0: off
    min_pixel_probability: float = 0.5
    min_component: int = 0  # pixels per slice
    min_component_fraction: float = 0.0  # of the organ's largest 3D component

    @classmethod
    def from_config(cls, train: TrainConfig, **overrides) -> "Postprocess":
        """The config's settings, with any override that is not None."""
        values = {f.name: getattr(train, f.name) for f in dataclasses.fields(cls)}
        return cls(**(values | {k: v for k, v in overrides.items() if v is not None}))

    @classmethod
    def from_info(cls, info: dict, source="tfseg.json") -> "Postprocess":
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in info]
        if missing:
            raise DataError(f"{source}: no {', '.join(missing)}; export the model again with this tfseg")
        return cls(**{f.name: info[f.name] for f in dataclasses.fields(cls)})

    def to_info(self) -> dict:
        return dataclasses.asdict(self)

    def masks(self, probabilities, presence=None) -> np.ndarray:
        """One volume's probabilities [D, H, W, C] at the original size (and presence [D, C] from a
        presence head) -> gated, cleaned uint8 0/1 masks."""
        return self.clean(slice_masks(self, np.asarray(probabilities), presence))

    def clean(self, masks) -> np.ndarray:
        """Thresholded masks [D, H, W, C] of one volume without their stray pieces."""
        return clean(masks, self.min_component, self.min_component_fraction)


def slice_masks(post: Postprocess, probabilities, presence=None):
    """Threshold and gating of probabilities [N, H, W, C] (presence [N, C] or None) -> uint8 0/1 masks:
    numpy in, numpy out; TensorFlow tensors in, a tensor out (the serving graph's `masks`)."""
    if isinstance(probabilities, np.ndarray):
        masks = (probabilities > post.threshold).astype(np.uint8)
        keep = np.ones((masks.shape[0], masks.shape[-1]), bool)
        if presence is not None:
            keep &= np.asarray(presence) >= post.presence_threshold
        if post.min_pixels > 0:
            keep &= np.count_nonzero(probabilities > post.min_pixel_probability, axis=(1, 2)) > post.min_pixels
        return masks * keep[:, None, None, :].astype(np.uint8)
    import tensorflow as tf

    masks = tf.cast(probabilities > post.threshold, tf.uint8)
    keep = tf.ones_like(masks[:, 0, 0, :], tf.bool)
    if presence is not None:
        keep &= presence >= post.presence_threshold
    if post.min_pixels > 0:
        pixels = tf.reduce_sum(tf.cast(probabilities > post.min_pixel_probability, tf.int32), axis=[1, 2])
        keep &= pixels > post.min_pixels
    return masks * tf.cast(keep, tf.uint8)[:, None, None, :]


def remove_small(masks: np.ndarray, min_pixels: int) -> np.ndarray:
    """Drop 8-connected components smaller than min_pixels from masks [..., H, W, C], per slice and class."""
    if min_pixels <= 1:
        return masks
    out = np.array(masks, np.uint8, copy=True)
    flat = out.reshape(-1, *out.shape[-3:])
    for image in flat:
        for c in range(image.shape[-1]):
            channel = np.ascontiguousarray(image[..., c])
            if not channel.any():
                continue
            _, labels, stats, _ = cv2.connectedComponentsWithStats(channel, connectivity=8)
            small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_pixels)
            small = small[small > 0]  # label 0 is the background
            if small.size:
                image[..., c][np.isin(labels, small)] = 0
    return out


def keep_large_3d(masks: np.ndarray, fraction: float) -> np.ndarray:
    """Per class of one volume [D, H, W, C]: drop 26-connected 3D components smaller than `fraction` x
    that class's largest component (fraction 1 keeps only the largest, ties kept; 0 keeps everything)."""
    if fraction <= 0:
        return masks
    out = np.array(masks, np.uint8, copy=True)
    for c in range(out.shape[-1]):
        labels, count = ndimage.label(out[..., c], structure=np.ones((3, 3, 3), bool))
        if count > 1:
            sizes = np.bincount(labels.ravel())[1:]
            small = np.flatnonzero(sizes < fraction * sizes.max()) + 1
            out[..., c][np.isin(labels, small)] = 0
    return out


def clean(masks: np.ndarray, min_pixels: int = 0, min_fraction: float = 0.0) -> np.ndarray:
    """Both steps on one volume's masks [D, H, W, C]: per slice first, then in 3D."""
    return keep_large_3d(remove_small(masks, min_pixels), min_fraction)
