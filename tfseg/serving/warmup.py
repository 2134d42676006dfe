"""The warm-up request TF Serving replays when it loads a model (assets.extra/tf_serving_warmup_requests),
so the first real request does not pay for graph tracing."""

import numpy as np
import tensorflow as tf

from tfseg.config import Config
from tfseg.data.context import context_rows
from tfseg.errors import DataError
from tfseg.layout import SIGNATURE
from tfseg.records.features import parse_volume
from tfseg.records.reader import shard_files


def sample_context(config: Config) -> list[bytes]:
    """K PNGs forming a real context: the middle slice of the first validation volume (or, without
    records, a synthetic 16-bit scan repeated K times)."""
    offsets = config.data.offsets
    try:
        shards = shard_files(config.data.records, config.data.val_folds)
    except DataError:
        shards = []
    for serialized in tf.data.TFRecordDataset(shards).take(1):
        pngs = parse_volume(serialized)["image_png"].numpy().tolist()
        return context_rows(pngs, offsets)[len(pngs) // 2]
    y, x = np.mgrid[:266, :266]
    scan = (2000 + 1500 * np.sin(x / 20.0) * np.cos(y / 30.0)).astype(np.uint16)
    return [tf.io.encode_png(scan[..., None]).numpy()] * len(offsets)


def warmup_record(pngs: list[bytes], model_name: str = "tfseg") -> bytes:
    """One serialized PredictionLog holding a serving_default PredictRequest for `pngs` ([1, K])."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE))
    request.inputs["slices"].CopyFrom(tf.make_tensor_proto([pngs], dtype=tf.string))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    return log.SerializeToString()
