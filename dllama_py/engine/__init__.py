"""The engine: one model over one transport (this node alone, or the root of a cluster), the
logits exchange between nodes, and sampling."""
