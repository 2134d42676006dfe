"""Stage 6, evaluation: the competition metric, post-processing (shared with predict and serving),
predictors over whole volumes, scoring and reports."""
