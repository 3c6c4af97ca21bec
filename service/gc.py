"""The artifact garbage collector: removes the artifact folders of jobs that retention expired.

The dispatcher deletes a finished job's record and events SCDD_RETENTION_DAYS after it ended and
queues `<tenant>/<job id>` for this collector; the collector deletes `<artifacts>/<tenant>/<job id>`
(a local folder or an object-store prefix) and forgets the entry. It only ever deletes folders of
expired jobs, never a queued or running job's, and only by names it has checked.

    python -m service.gc      # once (e.g. from cron or a Kubernetes CronJob); prints what it removed
"""

from __future__ import annotations

import logging
import sys

import fsspec

from service.admission import job_prefix
from service.auth import TENANT
from service.blocking_jobstore import BlockingJobStore
from service.records import JOB_ID
from service.redact import redact_url
from service.settings import Settings

log = logging.getLogger("scdd.gc")


def collect(store: BlockingJobStore, settings: Settings) -> list[str]:
    """Remove the artifacts of every expired job queued for it; the prefixes removed."""
    removed = []
    for tenant, job_id in store.expired_jobs():
        if not (TENANT.match(tenant) and JOB_ID.match(job_id)):
            log.warning("skipping an expired entry with an unexpected name: %r/%r", tenant, job_id)
            continue
        if store.get(job_id) is not None:  # ids are never reused; a record means this is no expired job
            log.warning("job %s has a record again: its artifacts stay", job_id)
            store.artifacts_removed(tenant, job_id)
            continue
        prefix = job_prefix(settings, tenant, job_id)
        fs, root = fsspec.core.url_to_fs(prefix)
        fs.invalidate_cache(root)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        store.artifacts_removed(tenant, job_id)
        removed.append(prefix)
    return removed


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    removed = collect(BlockingJobStore.connect(settings.redis_url, settings.redis_prefix), settings)
    for prefix in removed:
        print(f"removed {redact_url(prefix)}")
    print(f"scdd gc: removed the artifacts of {len(removed)} expired jobs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
