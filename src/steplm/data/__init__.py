"""Data: corpus reading, tokenizers, token shards and batch sampling."""
