"""Node classes, grouped by concept. The registry (``flowopd_nodes.registry``) lists them explicitly."""
