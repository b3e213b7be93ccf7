"""Code shared by several recipes (data generators, tokenizer helpers, training utilities, GGUF writer).

Recipe-specific code stays in the recipe; a helper moves here once two recipes need it.
Modules here may import torch and friends: only recipes' run() imports them.
"""
