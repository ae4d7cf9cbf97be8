"""Stable Diffusion fine-tuning on Colossal-AI: the pieces behind ``stable_diffusion_colossalai_trainer.py``."""
