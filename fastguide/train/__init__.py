"""Training: noise-aware classifiers (ECT) and diffusion models, on one process or torchrun DDP."""
