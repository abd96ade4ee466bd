"""Training machinery shared by every trainer: the LoRA trainer base, fit() (checkpoints, resume, signals), \
checkpoints, EMA, data parallelism, flow-matching pretraining."""
