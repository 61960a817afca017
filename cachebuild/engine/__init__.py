"""The descriptor network and the engine that runs it: key, probes, backends, TensorRT."""
