"""flowopd_nodes: typed nodes over ``flowopd_core`` and the graph engine (YAML load, validation, scheduler).

The node classes follow ComfyUI's V1 contract, so the same classes load in ComfyUI and in ``runner.py``.
"""
