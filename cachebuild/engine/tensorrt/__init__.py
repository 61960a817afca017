"""The TensorRT backend: the runner and its decisions as pure functions."""
