"""The 2.5D context rule: channel c of slice i is slice i + offsets[c], clamped to the volume's ends.

Training and evaluation stack tensors (`context_stack`); predict, the client and the warm-up request
build rows of PNG files (`context_rows`); overlays and TensorBoard show the centre channel
(`centre_index`). TensorFlow-free until `context_stack` is called.
"""


def centre_index(offsets) -> int:
    """The channel of the slice itself: offset 0, else the middle channel."""
    offsets = list(offsets)
    return offsets.index(0) if 0 in offsets else len(offsets) // 2


def context_rows(items: list, offsets) -> list[list]:
    """Row i = items[i + o] for each offset o, clamped to the ends (as context_stack does)."""
    last = len(items) - 1
    return [[items[min(max(i + o, 0), last)] for o in offsets] for i in range(len(items))]


def context_stack(volume, offsets):
    """2.5D input: volume [D, H, W] -> [D, H, W, C], channel c of slice i = slice i + offsets[c],
    clamped at the ends; offsets (0,) gives plain 2D."""
    import tensorflow as tf

    depth = tf.shape(volume, out_type=tf.int32)[0]
    index = tf.range(depth)
    return tf.stack([tf.gather(volume, tf.clip_by_value(index + o, 0, depth - 1)) for o in offsets], axis=-1)
