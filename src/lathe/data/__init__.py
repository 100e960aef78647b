"""Data: registry -> source files -> conversations -> template -> token ids and labels.

Never imports a model; the tokenizer is handed in by the recipe.
"""
