"""The run: the experience loop, its Trainer, step checkpoints, resume, signals and the DDP stop decision."""
