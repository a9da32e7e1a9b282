"""TA-Tok training: the tokenizer LightningModule and the semantic teacher for the miniature."""
