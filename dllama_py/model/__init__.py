"""The model itself: its configuration, its tensors and how a plan cuts them over nodes, the
forward pass over one node's slice, and the kernels (the typed face of the C++ core)."""
