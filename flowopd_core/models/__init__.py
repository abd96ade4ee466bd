"""The model layer: SD3-family pipelines, the policy (one base + named LoRA adapters), model handles, LoRA merging."""
