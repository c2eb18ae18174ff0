"""Training of a tiny Cheers on the synthetic shapes world (docs/training.md).

data.py builds batches (template, labels, CFG dropout), objective.py the loss (docs/architecture.md §14),
loop.py the staged recipe and the trainer, checkpointing.py its resumable checkpoints (weights, optimizer, state
file), plots.py the loss curves; the `cheers-deploy train` command lives in cli/train.py.
Needs torch.
"""
