"""Checkpoint families: each family's keys, its config in both directions, its tokenizer and
preprocessing; the file reader and the loader."""
