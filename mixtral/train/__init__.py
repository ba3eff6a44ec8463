"""Training: one loop for pretraining, SFT and DPO, with its losses, schedule and checkpoints."""
