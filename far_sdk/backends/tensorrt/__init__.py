"""The TensorRT backend: :mod:`~far_sdk.backends.tensorrt.backend` (the loop's stages on engines and CUDA graphs),
:mod:`~far_sdk.backends.tensorrt.engine` (one engine's lifecycle) and :mod:`~far_sdk.backends.tensorrt.cache`
(plans keyed by what they were built from, shared with ``far-export trt``). Importing this package imports
neither tensorrt nor cuda-python."""
