"""steplm: STEP (STaged parameter-Efficient Pre-training, Yano et al., NAACL 2025) for LLaMA models."""
__version__ = "0.1.0"
