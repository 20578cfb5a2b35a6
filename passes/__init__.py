"""The graph passes, installed as `sparsify.passes`: find_attention, observe and rewrite_attention (rules in README.md)."""
