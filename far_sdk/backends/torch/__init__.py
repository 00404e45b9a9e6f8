"""The PyTorch backends: :mod:`~far_sdk.backends.torch.backend` (the fast path and the official-way eager
baseline; the only place far_sdk reaches into ``training``), :mod:`~far_sdk.backends.torch.fast` (device and the
compiled inner step), :mod:`~far_sdk.backends.torch.graphs` (captured CUDA graphs) and
:mod:`~far_sdk.backends.torch.state` (per-batch device buffers). Importing this package imports neither torch nor
training."""
