"""upcycle: sparse upcycling of dense language models into Hugging Face Mixture-of-Experts checkpoints."""

__version__ = "0.1.0"
