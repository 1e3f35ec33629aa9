"""Evaluation: perplexity, the zero-shot tasks, generation and MT-Bench answers."""
