"""The serving graph: the SavedModel's signatures around one or more float32 Keras models (members).

- `serving_default`: `slices` string [N, K], each a 16-bit greyscale PNG (K = len(data.offsets) context
  slices, all of one size; the spec says [N, ?], predict_float's [N, h, w, K] gives K) -> `probabilities`
  float32 [N, H, W, 3] and `masks` uint8 [N, H, W, 3] at the
  PNGs' resolution. Decoding, normalisation (over the distinct slices of the whole request, as training
  does over a volume), resizing and the threshold all happen in the graph, with the training code's
  own functions; bad input fails with an InvalidArgumentError naming the problem.
- `masks_png`: `slices` as serving_default -> `masks_png` string [N], one RGB PNG per slice.
- `predict_float`: `scans` float32 [N, h, w, K], already normalised and at the model size ->
  `probabilities` float32 [N, h, w, 3].
- `serving_volume`: `slices` string [D], every slice of one volume once, in slice order -> `masks_png`
  string [D]. The graph normalises over the whole volume and builds each member's input itself (2.5D:
  the K-slice contexts, clamped at the volume's ends), so the answer is training's, and small.
- `volume_probabilities`: `slices` as serving_volume -> `probabilities` float32 [D, H, W, 3], `masks`
  uint8 [D, H, W, 3] (and `presence` [D, 3]): the fused probabilities evaluate scores.

The volume signatures fuse the members at each scan's size: every member turns the volume into
probabilities at its model size (tfseg.model.inference.member_probabilities), they go back to the scans'
size and are averaged with the members' weights; then the threshold and gating. PNG headers are checked
(16-bit greyscale, at most max_image_size px a side, one size per request) before anything is decoded.
"""

import tensorflow as tf

from tfseg import CLASSES
from tfseg.data.preprocess import normalize, resize_images, restore_size
from tfseg.evaluation.postprocess import Postprocess, slice_masks
from tfseg.layout import (
    MASKS_PNG,
    MAX_IMAGE_SIZE,
    PREDICT_FLOAT,
    SIGNATURE,
    VOLUME_PROBABILITIES,
    VOLUME_SIGNATURE,
)
from tfseg.model.inference import Member, averaged, chunked, member_probabilities, model_kind

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A PNG starts with its 8-byte signature, then the IHDR chunk: length (4), "IHDR" (4), width (4),
# height (4), bit depth (1, offset 24), colour type (1, offset 25; 0 = greyscale).
HEADER_BYTES = 26
BIT_DEPTH = 16  # scans are 16-bit greyscale PNGs


def _check_all(ok, message: str, where: str):
    """Assert a boolean table; the error names the first failing index ([row, slot] or [slice])."""
    first = tf.where(tf.logical_not(ok))[:1]
    return tf.debugging.Assert(tf.reduce_all(ok), [message, f"first failing {where}:", first])


def check_headers(slices, max_image_size: int, where: str) -> list:
    """Assertions on the PNG headers of a string tensor (any shape, at least one item), read from the
    first bytes only: a PNG, 16-bit, greyscale, 1..max_image_size px a side, one size for all. Run them
    (control dependencies) before decoding: a small file can declare an image of gigabytes."""
    # Padding makes every string long enough to slice the header from, so short junk fails our checks.
    head = tf.strings.substr(tf.strings.join([slices, tf.constant(b"\0" * HEADER_BYTES)]), 0, HEADER_BYTES)
    width_height = tf.io.decode_raw(tf.strings.substr(head, 16, 8), tf.int32, little_endian=False)
    width_height = tf.reshape(width_height, tf.concat([tf.shape(slices), [2]], 0))
    flat = tf.reshape(width_height, [-1, 2])
    tests = [
        (lambda: tf.equal(tf.strings.substr(head, 0, 16), PNG_MAGIC + b"\0\0\0\x0dIHDR"), "a slice is not a PNG file"),
        (lambda: tf.equal(tf.strings.substr(head, 24, 1), bytes([BIT_DEPTH])),
         "a slice is not a 16-bit PNG (scans are 16-bit greyscale; 8-bit would lose intensities)"),
        (lambda: tf.equal(tf.strings.substr(head, 25, 1), b"\x00"),
         "a slice is not a greyscale PNG (PNG colour type must be 0)"),
        (lambda: tf.reduce_all((width_height > 0) & (width_height <= max_image_size), axis=-1),
         f"a slice declares a width or height outside 1..{max_image_size} px (the model's max_image_size, "
         "set at export)"),
        (lambda: tf.reduce_all(tf.equal(width_height, flat[0]), axis=-1),
         "the slices of one request must all have the same width and height"),
    ]
    checks = []
    for test, message in tests:  # one after the other: the error names the first problem
        with tf.control_dependencies(checks[-1:]):
            checks.append(_check_all(test(), message, where))
    return checks


def _decode(pngs):
    """16-bit greyscale PNGs [U] -> uint16 [U, H, W] (headers checked already)."""
    images = tf.map_fn(lambda png: tf.io.decode_png(png, channels=1, dtype=tf.uint16)[..., 0], pngs,
                       fn_output_signature=tf.TensorSpec([None, None], tf.uint16))
    return tf.ensure_shape(images, [None, None, None])


def decode_volume(slices, max_image_size: int = MAX_IMAGE_SIZE):
    """Check and decode a [D] string tensor, one volume's slices in order -> uint16 [D, H, W]."""
    with tf.control_dependencies([tf.debugging.assert_positive(tf.size(slices),
                                                               message="the request holds no slices")]):
        checks = check_headers(slices, max_image_size, "slice")
    with tf.control_dependencies(checks):
        return _decode(tf.identity(slices))


def decode_slices(slices, offsets, max_image_size: int = MAX_IMAGE_SIZE):
    """Check and decode a [N, K] string tensor of 16-bit greyscale PNGs (K = len(offsets)).

    Returns (distinct slices uint16 [U, H, W], index int32 [N, K] into them). Identical bytes decode
    once: a whole volume's K-slice contexts then decode K times fewer PNGs. The distinct slices come
    in slice order (row r, column c holds slice r + offsets[c], clamped), so the percentiles over them
    are those training takes over the volume, whatever the offsets.
    """
    num_context = len(offsets)
    shape = tf.shape(slices)
    checks = [
        tf.debugging.assert_positive(tf.size(slices), message="the request holds no slices"),
        # One sentence and the count sent: a row of another K is a client built for another model.
        tf.debugging.Assert(tf.equal(shape[1], num_context), [
            f"each row of slices must hold K = {num_context} PNGs, the slices at offsets "
            f"{','.join(map(str, offsets))} the model was trained with (read them from its metadata); the "
            "rows of this request hold", shape[1]]),  # no apostrophes: Assert prints them escaped
    ]
    with tf.control_dependencies(checks):
        checks += check_headers(slices, max_image_size, "[row, slot]")
    with tf.control_dependencies(checks):
        distinct, flat_index = tf.unique(tf.reshape(slices, [-1]))
    position = tf.clip_by_value(tf.range(shape[0])[:, None] + tf.constant(list(offsets), tf.int32)[None, :],
                                0, shape[0] - 1)
    first = tf.math.unsorted_segment_min(tf.reshape(position, [-1]), flat_index, tf.size(distinct))
    order = tf.argsort(first, stable=True)
    distinct = tf.gather(distinct, order)
    index = tf.gather(tf.math.invert_permutation(order), tf.reshape(flat_index, [shape[0], num_context]))
    return _decode(distinct), index


def _encode_masks(masks):
    """Masks uint8 [N, H, W, 3] of 0/1 -> one RGB PNG per slice (255 where large bowel (R), small bowel
    (G), stomach (B)): a whole volume's answer is a few hundred kB, where REST's JSON numbers take MBs."""
    return tf.map_fn(tf.io.encode_png, masks * tf.constant(255, tf.uint8),
                     fn_output_signature=tf.TensorSpec([], tf.string))


def _input_settings(config) -> tuple:
    d = config.data
    return tuple(d.image_size), tuple(d.clip_percentiles), d.resize, d.interpolation


def fused_volume(members: list[Member], tta=(), chunk: int = 16, num_classes: int = len(CLASSES)):
    """images uint16 [D, H, W] (one whole volume) -> (probabilities float32 [D, H, W, C] at the scans'
    size, presence [D, C] or None): each member's probabilities (member_probabilities) brought back to
    the scans' size, averaged with the members' weights. Members with the same input settings share
    their normalised, resized volume."""
    total = sum(m.weight for m in members)
    functions = [member_probabilities(m, tta, chunk, num_classes) for m in members]
    with_presence = all(m.has_presence for m in members)

    def call(images):
        orig_hw = tf.unstack(tf.shape(images)[1:3])
        inputs, probabilities, presence = {}, 0.0, 0.0
        for member, function in zip(members, functions, strict=True):
            d = member.config.data
            key = _input_settings(member.config)
            if key not in inputs:  # normalised over the whole volume, as training does
                inputs[key] = resize_images(normalize(images, d.clip_percentiles)[..., None], tuple(d.image_size), d)
            probs, member_presence = function(inputs[key])
            share = member.weight / total
            probabilities += share * restore_size(probs, orig_hw, d)
            if with_presence:
                presence += share * member_presence
        return probabilities, presence if with_presence else None

    return call


def per_slice(members: list[Member]) -> bool:
    """Whether the per-slice signatures (K-slice rows) can serve these members: only 2.5D models take
    rows; a fusion with a 3D member serves whole volumes only."""
    return all(model_kind(m.config) == "2.5d" for m in members)


def serving_functions(members: list[Member], post: Postprocess, chunk: int = 16, tta=(),
                      max_image_size: int = MAX_IMAGE_SIZE):
    """Signature name -> (function, input signature) of the SavedModel: the weighted average of the
    members over the scans and their `tta` flips, gated by `post`. The per-slice signatures give every
    member the same input, so the members share it (savedmodel.check_members): the first member's."""
    num_classes = len(CLASSES)
    with_presence = all(m.has_presence for m in members)
    volume = fused_volume(members, tta, chunk, num_classes)

    def outputs(probabilities, presence):
        out = {"probabilities": probabilities, "masks": slice_masks(post, probabilities, presence)}
        return out | ({"presence": presence} if with_presence else {})

    def volume_probabilities(slices):
        return outputs(*volume(decode_volume(slices, max_image_size)))

    def serving_volume(slices):
        return {"masks_png": _encode_masks(volume_probabilities(slices)["masks"])}

    one_volume = [tf.TensorSpec([None], tf.string, name="slices")]
    signatures = {VOLUME_SIGNATURE: (serving_volume, one_volume),
                  VOLUME_PROBABILITIES: (volume_probabilities, one_volume)}
    if not per_slice(members):
        return signatures
    d = members[0].config.data
    height, width = d.image_size
    num_context = len(d.offsets)
    predict = averaged([m.model for m in members], tta, [m.weight for m in members])

    def predict_png(slices):
        images, index = decode_slices(slices, d.offsets, max_image_size)
        orig_hw = tf.unstack(tf.shape(images)[1:3])
        scans = normalize(images, d.clip_percentiles)
        scans = resize_images(scans[..., None], (height, width), d)[..., 0]
        scans = tf.ensure_shape(tf.transpose(tf.gather(scans, index), [0, 2, 3, 1]),
                                [None, height, width, num_context])
        probabilities, presence = chunked(lambda start, stop: predict(scans[start:stop]), tf.shape(scans)[0], chunk,
                                          (height, width), num_classes, with_presence)
        return outputs(restore_size(probabilities, orig_hw, d), presence)

    def predict_masks_png(slices):
        return {"masks_png": _encode_masks(predict_png(slices)["masks"])}

    def predict_float(scans):
        probabilities, presence = chunked(lambda start, stop: predict(scans[start:stop]), tf.shape(scans)[0], chunk,
                                          (height, width), num_classes, with_presence)
        return {"probabilities": probabilities} | ({"presence": presence} if with_presence else {})

    # Any K in the spec, so that a row of another K reaches the graph's check and its sentence (TF Serving
    # does not check shapes against the SignatureDef); predict_float's spec tells clients K.
    rows = [tf.TensorSpec([None, None], tf.string, name="slices")]
    return {
        SIGNATURE: (predict_png, rows),
        MASKS_PNG: (predict_masks_png, rows),
        PREDICT_FLOAT: (predict_float, [tf.TensorSpec([None, height, width, num_context], tf.float32, name="scans")]),
        **signatures,
    }
