"""Node classes, grouped by concept. The registry (``flowopd_nodes.nodes.registry``) lists them explicitly."""
