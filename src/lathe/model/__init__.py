"""Model: tokenizer and model loading, and what is trained. Never touches data files."""
