"""``far bench``'s measurements: :mod:`~far_sdk.bench.protocol` (what is timed and how),
:mod:`~far_sdk.bench.environment` (machine, versions, threads, memory, matmul peak) and
:mod:`~far_sdk.bench.flops` (analytic FLOP counts per stage)."""
