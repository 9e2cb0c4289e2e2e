"""Bridges to the PyTorch editing tools: their hparams files (hparams_files) and the checkpoints they
edited (checkpoints)."""
