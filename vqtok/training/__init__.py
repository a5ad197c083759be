"""Training: the loop with checkpoints and resume (`loop`), per-modality losses and validation (`imagesets`,
`audiosets`), and the torch.distributed set-up for torchrun (`distributed`)."""
