"""Stage 2, TFRecords: the feature spec, the sharded writer (plan, worker processes, shards, manifest),
the reader and inspection. TensorFlow-free except where records are decoded."""
