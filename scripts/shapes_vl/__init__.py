"""The recipe of the shipped small model (models/shapes-vl): the shapes task's data, tokenizer,
training, evaluation and checkpoint writer, and its chat messages (`chat`)."""
