"""/-/actor/sync-all-sources: run every syncable actor source now (diagnostics secret).

Like the reference it bypasses the sync lock. Instead of the reference's
captured log lines, the body is JSON: ``{"synced": {"<source>": <count>}}``
on success, or a 500 error naming each source that failed.
"""

from __future__ import annotations

from errors import GatewayError
from handlers.diagnostics import DiagnosticsHandler


class SyncAllSourcesHandler(DiagnosticsHandler):
    async def get(self) -> None:
        report = await self.services.actors.sync_all()
        failed = {name: result for name, result in report.items() if isinstance(result, str)}
        if failed:
            raise GatewayError("; ".join(f"{name}: {result}" for name, result in failed.items()))
        self.write_json(200, {"synced": report})

    post = get
    put = get
