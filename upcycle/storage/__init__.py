"""Checkpoints on disk, shared by every command: reading tensors lazily from safetensors, GGUF or (when asked)
pickle files, opening a dense parent, and the manifest a converted folder carries (its format and digests)."""
