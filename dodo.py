"""``doit``: bring the CVMFS repository in step with recipes/ (see README.md).

    doit                      # resolve, convert what is stale, publish (the cron job)
    doit list / doit info X   # inspect, offline
    doit forget layer:<hex>   # force a rebuild
"""

from unpacked.build.dodo import load

globals().update(load())
