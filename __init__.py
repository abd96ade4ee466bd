"""flowopd as a ComfyUI custom-node package.

ComfyUI imports this folder (the repository, linked or cloned into ``ComfyUI/custom_nodes/``) and reads the
mappings below. The node classes come from :mod:`flowopd_nodes.comfy.plugin`, the one module that talks to ComfyUI.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    # flowopd_core and flowopd_nodes import each other by absolute name; appended, so nothing of ComfyUI's
    # own (its ``tests``, ``nodes``) is shadowed by a folder of this repository.
    sys.path.append(_ROOT)

from flowopd_nodes.comfy.plugin import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
