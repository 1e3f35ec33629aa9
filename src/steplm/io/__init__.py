"""Reading and writing model folders: run folders, checkpoints, Hugging Face folders."""
