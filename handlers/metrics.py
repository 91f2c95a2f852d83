"""GET /metrics: the Prometheus scrape on the main port (SPEC point 11).

Open like the reference's Prometheus exporter: metrics hold no secrets and
no actor ids. Answers 404 when no metrics registry was installed.
"""

from __future__ import annotations

import asyncio

from errors import NotFound
from handlers.base import BaseHandler


class MetricsHandler(BaseHandler):
    route_class = "metrics"
    operation = "metrics"

    async def get(self) -> None:
        metrics = self.services.metrics
        if metrics is None:
            raise NotFound("404 page not found")
        # Copy the state other parts keep on the loop thread, then render off it
        # (multi-process mode reads every worker's files).
        metrics.sample()
        accept = self.request.headers.get("Accept")
        if metrics.multiproc_dir:
            body, content_type = await asyncio.get_running_loop().run_in_executor(None, metrics.exposition, accept)
        else:
            body, content_type = metrics.exposition(accept)
        self.set_header("Content-Type", content_type)
        self.finish(body)
