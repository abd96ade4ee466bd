"""Stage 2, Flow-OPD: the cold start, the distillation loss (routing, per-step KL, MAR) and the trainer."""
