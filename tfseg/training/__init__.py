"""Stage 5, training: strategies, optimizer, steps, the loop, the run folder, TensorBoard, curves."""
