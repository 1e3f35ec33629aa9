"""Passes over a built model: growth, LoRA adapters."""
