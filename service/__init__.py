"""The HTTP service: `python -m service` (see docs/SERVICE.md). `create_app(settings)` is in service.main."""

import os

# Before torch (and its OpenMP runtime) loads: idle OpenMP threads sleep instead of spinning. The service runs
# compute next to decode threads, the event loop and often other processes; spinning threads then steal the cores
# they wait for, and torch at batch 1 fell from ~60 to ~1-2 images/s on a busy 2-core host (docs/BENCHMARKS.md,
# "Speed (issue 13)"). OMP_WAIT_POLICY=ACTIVE in the environment keeps spinning on a dedicated host.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
