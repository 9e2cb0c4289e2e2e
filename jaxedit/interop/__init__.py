"""Bridges to the PyTorch editing tools: their hparams files (hparams_files), the checkpoints they
edited (checkpoints), and EasyEdit's editor API in front of jaxedit (easyedit)."""
