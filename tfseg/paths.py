"""Default locations, relative to the working directory, so every command runs out of the box."""

SYNTH_DATA_DIR = "data/synth"  # the built-in synthetic dataset (Kaggle layout)
RECORDS_DIR = "records/synth"  # TFRecords made from it
RUNS_DIR = "runs"
SAVED_MODELS_DIR = "saved_models"
