"""The ``far`` command (:mod:`~far_sdk.cli.main`) and what ``far``, ``far-export`` and ``far-train`` share:
:mod:`~far_sdk.cli.run` (one error line, documented exit codes) and :mod:`~far_sdk.cli.sampling` (the
sampling flags, derived from :class:`far_sdk.SamplingOptions`). One module per command group."""
