"""The TensorRT backend: :mod:`~far_sdk.backends.tensorrt.backend` (the loop's stages on engines),
:mod:`~far_sdk.backends.tensorrt.graphs` (captured CUDA graphs of the denoiser loop),
:mod:`~far_sdk.backends.tensorrt.transfers` (the stream and its copies), :mod:`~far_sdk.backends.tensorrt.engine`
(one engine's lifecycle), and the engine cache shared with ``far-export trt``: :mod:`~far_sdk.backends.tensorrt.cache`
(finding a plan), :mod:`~far_sdk.backends.tensorrt.cache_key` (what it was built for),
:mod:`~far_sdk.backends.tensorrt.cache_store` (writing it). Importing this package imports neither tensorrt nor
cuda-python."""
