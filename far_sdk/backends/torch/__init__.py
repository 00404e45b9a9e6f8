"""The PyTorch backends: :mod:`~far_sdk.backends.torch.backend` (the fast path: captured CUDA graphs, the
compiled denoiser step, on-device noise; and the official-way eager baseline) and
:mod:`~far_sdk.backends.torch.state` (per-batch device buffers). The only place far_sdk reaches into
``training``; importing this package imports neither torch nor training."""
