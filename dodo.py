"""``doit``: bring the CVMFS repository in step with recipes/ (see README.md).

    doit                      # resolve, convert what is stale, publish (the cron job)
    doit list / doit info X   # inspect, offline
    doit forget layer:<hex>   # force a rebuild
"""

import sys

from unpacked import log
from unpacked.build.plan import current_settings
from unpacked.build.run import check_recipes, doit_config, is_run, prepare_run
from unpacked.build.tasks import (  # noqa: F401  (doit finds task_* here)
    task__txn,
    task_flat,
    task_gc,
    task_image,
    task_layer,
    task_publish,
    task_thin,
)

log.setup()
SETTINGS = current_settings()
check_recipes(SETTINGS)
if is_run(sys.argv):
    prepare_run(SETTINGS)        # lock, crash recovery, resolve (the only network step)
DOIT_CONFIG = doit_config(SETTINGS)
