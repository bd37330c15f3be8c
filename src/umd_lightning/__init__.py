"""UMD for medical vision-language models: MR-Pretrain, TD-Calib and GM-Coord fine-tuning on Lightning."""

__version__ = "0.1.0"
