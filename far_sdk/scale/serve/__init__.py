"""``far serve``: a :class:`~far_sdk.Generator` behind HTTP (FastAPI on Ray Serve), with streamed previews.

- :mod:`~far_sdk.scale.serve.config`: :class:`ServeConfig` and the Ray Serve options (no Ray needed);
- :mod:`~far_sdk.scale.serve.batching`: requests merged by settings into ``generate`` calls, previews (no Ray);
- :mod:`~far_sdk.scale.serve.models`: the request/response models, generated from :mod:`far_sdk.options` (pydantic);
- :mod:`~far_sdk.scale.serve.requests`: a request checked against its bundle;
- :mod:`~far_sdk.scale.serve.app`: the replica and its routes (FastAPI, Ray); static/playground.html the page at ``/``;
- :mod:`~far_sdk.scale.serve.metrics`: Prometheus metrics; :mod:`~far_sdk.scale.serve.deploy`: start and stop.

Only config and deploy load here: Ray, FastAPI and pydantic are imported when a deployment is built, so ``far``
starts without them.
"""

from far_sdk.scale.serve.config import DEPLOYMENT_NAME, ServeConfig, deployment_options
from far_sdk.scale.serve.deploy import build_app, start, stop

__all__ = ["DEPLOYMENT_NAME", "ServeConfig", "build_app", "deployment_options", "start", "stop"]
