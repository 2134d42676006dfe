"""The warm-up requests TF Serving replays when it loads a model (assets.extra/tf_serving_warmup_requests),
so the first real request does not pay for graph tracing: one context row for serving_default and a
short volume for serving_volume."""

import numpy as np
import tensorflow as tf

from tfseg.config import Config
from tfseg.data.context import context_rows
from tfseg.errors import DataError
from tfseg.layout import SIGNATURE
from tfseg.records.features import parse_volume
from tfseg.records.reader import shard_files

VOLUME_SLICES = 8  # slices of the warm-up volume: enough to run every branch, small enough to keep the file small


def sample_requests(config: Config, min_slices: int = 0) -> tuple[list[bytes], list[bytes]]:
    """(K PNGs forming a real context: the middle slice of the first validation volume; that volume's
    middle max(VOLUME_SLICES, min_slices) slices in order). Without records: a synthetic 16-bit scan,
    repeated."""
    offsets, count = config.data.offsets, max(VOLUME_SLICES, min_slices)
    try:
        shards = shard_files(config.data.records, config.data.val_folds)
    except DataError:
        shards = []
    for serialized in tf.data.TFRecordDataset(shards).take(1):
        pngs = parse_volume(serialized)["image_png"].numpy().tolist()
        if len(pngs) >= count:
            start = len(pngs) // 2 - count // 2
            return context_rows(pngs, offsets)[len(pngs) // 2], pngs[start:start + count]
    y, x = np.mgrid[:266, :266]
    scan = (2000 + 1500 * np.sin(x / 20.0) * np.cos(y / 30.0)).astype(np.uint16)
    png = tf.io.encode_png(scan[..., None]).numpy()
    return [png] * len(offsets), [png] * count


def warmup_record(slices: list, signature: str = SIGNATURE, model_name: str = "tfseg") -> bytes:
    """One serialized PredictionLog holding a PredictRequest of `signature` whose `slices` input is
    `slices` ([1, K] rows for serving_default, [D] for serving_volume)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
    request.inputs["slices"].CopyFrom(tf.make_tensor_proto(slices, dtype=tf.string))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    return log.SerializeToString()
