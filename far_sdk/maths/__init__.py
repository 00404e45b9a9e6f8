"""The ground floor: FAR's sampling maths as pure NumPy functions of plain arguments (no I/O, no runtimes).

- :mod:`~far_sdk.maths.diffusion`: DDPM / DDIM tables and the denoiser's per-step ``Step`` rows;
- :mod:`~far_sdk.maths.schedules`: outer levels, CFG, temperature and inner-step schedules, ``SamplingPlan``;
- :mod:`~far_sdk.maths.filters`: the frequency filters and the token <-> grid layout;
- :mod:`~far_sdk.maths.noise`: the Philox4x32-10 noise streams (one seed, one image, on every backend);
- :mod:`~far_sdk.maths.masking`: mask mode's per-step token masks.
"""
