"""flowopd_core: the Flow-OPD library (samplers, models, rewards, GRPO, OPD, merges, eval, checkpoints).

This package never imports ``flowopd_nodes``, networkx, yaml or ComfyUI: it runs and is tested alone.
"""

__version__ = "0.1.0"
