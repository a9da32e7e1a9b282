"""The unified LM: mixed-task next-token training over the expanded vocabulary."""
