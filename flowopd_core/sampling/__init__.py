"""Sampling: ODE / SDE / CPS flow samplers with per-step log-probs, and sampling a pipeline for prompts."""
