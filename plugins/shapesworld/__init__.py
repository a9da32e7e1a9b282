"""ShapesWorld: procedural scenes, GenEval/POPE-style prompts and a deterministic oracle (CPU miniature)."""
