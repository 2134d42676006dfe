"""Stage 3, input: preprocessing shared with serving, the 2.5D context rule, augmentation, tf.data pipelines."""
