"""Training of a tiny Cheers on the synthetic shapes world (docs/training.md).

data.py builds batches (template, labels, CFG dropout), objective.py the loss (ARCHITECTURE.md §14),
loop.py the staged recipe with resumable checkpoints, cli.py the `cheers-deploy train` command.
Needs torch.
"""
