"""The model under a pattern: the F/S patch, the kernels installed in its attention, and the layer loop."""
