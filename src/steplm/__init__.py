"""steplm: STEP (STaged parameter-Efficient Pre-training, Yano et al., NAACL 2025) for LLaMA models."""
from steplm._reproducible import pin_mkl_branch

pin_mkl_branch()  # before torch's first MKL call: the same run gives the same weights (_reproducible.py)
del pin_mkl_branch
__version__ = "0.1.0"
