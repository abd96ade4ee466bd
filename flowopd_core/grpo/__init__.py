"""Stage 1, Flow-GRPO teachers: the loss (advantages, PPO clip, KL to the reference) and the trainer."""
