"""Few-step distillation of FAR's per-token denoiser (``far-train distill``; docs/DISTILLATION.md).

- :mod:`.teacher`: data-free teacher trajectories (the frozen transformer's conditions at every outer step's
  level, the teacher's DDPM chain states at the student's jump points);
- :mod:`.objective`: the Gaussian moment-matching loss of one student jump;
- :mod:`.train`: the training loop (resumable, DDP under torchrun), checkpoints and the student file.
"""
