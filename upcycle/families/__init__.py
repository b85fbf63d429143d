"""Architecture knowledge as data: dense parent families and Hugging Face MoE types."""
