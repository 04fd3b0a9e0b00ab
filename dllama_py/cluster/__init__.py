"""A cluster: the wire protocol, the mesh of sockets and its sync, the root's side (connect the
workers, ship their slices) and `dllama worker`."""
