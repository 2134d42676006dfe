"""The serving graph: the SavedModel's signatures around a float32 Keras model.

- `serving_default`: `slices` string [N, K], each a 16-bit greyscale PNG (K = len(data.offsets) context
  slices, all of one size) -> `probabilities` float32 [N, H, W, 3] and `masks` uint8 [N, H, W, 3] at the
  PNGs' resolution. Decoding, normalisation (over the distinct slices of the whole request, as training
  does over a volume), resizing and the threshold all happen in the graph, with the training code's
  own functions; bad input fails with an InvalidArgumentError naming the problem.
- `predict_float`: `scans` float32 [N, h, w, K], already normalised and at the model size ->
  `probabilities` float32 [N, h, w, 3].
"""

import keras
import tensorflow as tf

from tfseg import CLASSES
from tfseg.config import Config
from tfseg.data.preprocess import normalize, resize_images, restore_size
from tfseg.evaluation.postprocess import Postprocess, slice_masks
from tfseg.layout import MASKS_PNG, PREDICT_FLOAT, SIGNATURE
from tfseg.model.inference import averaged

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A PNG starts with its 8-byte signature, then the IHDR chunk: length (4), "IHDR" (4), width (4),
# height (4), bit depth (1, offset 24), colour type (1, offset 25; 0 = greyscale).
HEADER_BYTES = 26


def _check_all(ok, message: str):
    """Assert a [N, K] boolean table; the error names the first failing (request row, context slot)."""
    first = tf.where(tf.logical_not(ok))[:1]
    return tf.debugging.Assert(tf.reduce_all(ok), [message, "first failing [row, slot]:", first])


def decode_slices(slices, offsets):
    """Check and decode a [N, K] string tensor of 16-bit greyscale PNGs (K = len(offsets)).

    Returns (distinct slices uint16 [U, H, W], index int32 [N, K] into them). Identical bytes decode
    once: a whole volume's K-slice contexts then decode K times fewer PNGs. The distinct slices come
    in slice order (row r, column c holds slice r + offsets[c], clamped), so the percentiles over them
    are those training takes over the volume, whatever the offsets.
    """
    num_context = len(offsets)
    shape = tf.shape(slices)
    # Padding makes every string long enough to slice the header from, so short junk fails our checks.
    head = tf.strings.substr(tf.strings.join([slices, tf.constant(b"\0" * HEADER_BYTES)]), 0, HEADER_BYTES)
    width_height = tf.io.decode_raw(tf.strings.substr(head, 16, 8), tf.int32, little_endian=False)
    width_height = tf.reshape(width_height, tf.concat([shape, [2]], 0))
    checks = [
        tf.debugging.assert_positive(tf.size(slices), message="the request holds no slices"),
        tf.debugging.assert_equal(shape[1], num_context, message=(
            f"each row of `slices` must hold K = {num_context} PNGs, the context slices the model was trained with")),
    ]
    with tf.control_dependencies(checks[:2]):
        checks += [
            _check_all(tf.equal(tf.strings.substr(head, 0, 8), PNG_MAGIC), "a slice is not a PNG file"),
            _check_all(tf.equal(tf.strings.substr(head, 24, 1), b"\x10"),
                       "a slice is not a 16-bit PNG (scans are 16-bit greyscale; 8-bit would lose intensities)"),
            _check_all(tf.equal(tf.strings.substr(head, 25, 1), b"\x00"),
                       "a slice is not a greyscale PNG (PNG colour type must be 0)"),
            _check_all(tf.reduce_all(tf.equal(width_height, width_height[:1, :1]), axis=-1),
                       "the slices of one request must all have the same width and height"),
        ]
    with tf.control_dependencies(checks):
        distinct, flat_index = tf.unique(tf.reshape(slices, [-1]))
    position = tf.clip_by_value(tf.range(shape[0])[:, None] + tf.constant(list(offsets), tf.int32)[None, :],
                                0, shape[0] - 1)
    first = tf.math.unsorted_segment_min(tf.reshape(position, [-1]), flat_index, tf.size(distinct))
    order = tf.argsort(first, stable=True)
    distinct = tf.gather(distinct, order)
    index = tf.gather(tf.math.invert_permutation(order), tf.reshape(flat_index, [shape[0], num_context]))
    images = tf.map_fn(lambda png: tf.io.decode_png(png, channels=1, dtype=tf.uint16)[..., 0], distinct,
                       fn_output_signature=tf.TensorSpec([None, None], tf.uint16))
    return tf.ensure_shape(images, [None, None, None]), index


def _run_chunked(predict, scans, chunk: int, num_classes: int, with_presence: bool):
    """predict(scans) -> (probabilities, presence or None), `chunk` slices at a time: a whole-volume
    request needs no more memory than a batch."""
    count = (tf.shape(scans)[0] + chunk - 1) // chunk
    empty = tf.TensorArray(tf.float32, size=count, infer_shape=False)

    def step(i, probabilities, presences):
        probs, presence = predict(scans[i * chunk:(i + 1) * chunk])
        presences = presences.write(i, presence) if with_presence else presences
        return i + 1, probabilities.write(i, tf.cast(probs, tf.float32)), presences

    _, probabilities, presences = tf.while_loop(lambda i, *_: i < count, step, (tf.constant(0), empty, empty),
                                                parallel_iterations=1)
    probabilities = tf.ensure_shape(probabilities.concat(), [None, *scans.shape[1:3], num_classes])
    return probabilities, tf.ensure_shape(presences.concat(), [None, num_classes]) if with_presence else None


def serving_functions(models: list[keras.Model], config: Config, chunk: int = 16, tta=()):
    """Signature name -> (function, input signature) of the SavedModel: the average of `models` (one,
    or an ensemble's members) over the scans and their `tta` flips, post-processed as config.train says."""
    d = config.data
    height, width = d.image_size
    num_context = len(d.offsets)
    post = Postprocess.from_config(config.train)
    predict = averaged(models, tta)
    with_presence = all(isinstance(m.output, dict) for m in models)
    num_classes = len(CLASSES)

    def predict_png(slices):
        images, index = decode_slices(slices, d.offsets)
        orig_hw = tf.unstack(tf.shape(images)[1:3])
        scans = normalize(images, d.clip_percentiles)
        scans = resize_images(scans[..., None], (height, width), d)[..., 0]
        scans = tf.ensure_shape(tf.transpose(tf.gather(scans, index), [0, 2, 3, 1]),
                                [None, height, width, num_context])
        probabilities, presence = _run_chunked(predict, scans, chunk, num_classes, with_presence)
        probabilities = restore_size(probabilities, orig_hw, d)
        out = {"probabilities": probabilities, "masks": slice_masks(post, probabilities, presence)}
        return out | ({"presence": presence} if with_presence else {})

    def predict_masks_png(slices):
        """The masks of serving_default as one PNG per slice (RGB: large bowel, small bowel, stomach; 255 where
        the organ is): a whole volume's answer is a few hundred kB, where REST's JSON numbers take MBs."""
        masks = predict_png(slices)["masks"] * tf.constant(255, tf.uint8)
        return {"masks_png": tf.map_fn(tf.io.encode_png, masks, fn_output_signature=tf.TensorSpec([], tf.string))}

    def predict_float(scans):
        probabilities, presence = _run_chunked(predict, scans, chunk, num_classes, with_presence)
        return {"probabilities": probabilities} | ({"presence": presence} if with_presence else {})

    signatures = {
        SIGNATURE: (predict_png, [tf.TensorSpec([None, num_context], tf.string, name="slices")]),
        MASKS_PNG: (predict_masks_png, [tf.TensorSpec([None, num_context], tf.string, name="slices")]),
        PREDICT_FLOAT: (predict_float, [tf.TensorSpec([None, height, width, num_context], tf.float32,
                                                        name="scans")]),
    }
    return signatures
