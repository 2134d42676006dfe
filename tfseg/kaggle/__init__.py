"""Stage 1, the Kaggle data: run-length masks, 16-bit scans, the folder index, patient folds, and a synthetic
dataset in the same layout. TensorFlow-free."""
