"""The ComfyUI side: the plugin (the one module that imports ComfyUI, behind a guard) and the API / UI JSON formats."""
