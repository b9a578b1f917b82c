"""Imported once by the worker forkserver (pool.startmethod): what every worker needs.

modeling_utils carries nearly all of transformers' import time (torch.distributed.tensor,
dynamo, generation); BERT is the family zeropool ships. Nothing here starts a thread, a
torch thread pool or CUDA: all three break across fork.
"""

import atexit
import gc
import os
import signal


def _import_what_workers_run() -> None:
    import transformers.modeling_utils
    import transformers.models.bert.modeling_bert  # noqa: F401

    import pool.bootstrap
    import pool.runtime  # noqa: F401


# Importing makes ~610k objects and little garbage (11k): the collector's passes over them
# were a sixth of the import's CPU (docs/benchmarks.md, session 16), so every pool start and
# every forkserver restarted after a crash is that much sooner done. The garbage is frozen
# with the rest below (a collection would cost 0.45 s to free ~9 MiB, once per machine).
gc.disable()
_import_what_workers_run()
_FORKSERVER_PID = os.getpid()
# A process group signalled as a whole (systemd's KillMode=control-group) must not take the
# forkserver down while the pool drains: a forked worker's exit status reaches the pool
# through it, and without it a clean exit reads as 255, a crash. It still ends with the pool
# (its alive pipe closes). Workers take SIGTERM back (pool.bootstrap).
signal.signal(signal.SIGTERM, signal.SIG_IGN)
# What every worker inherits is never garbage: out of the collector's sight, a worker's
# collections neither scan it nor write to its pages (which would un-share them).
gc.freeze()
gc.enable()


@atexit.register
def _exit_without_teardown() -> None:
    # The forkserver exits when the pool does; torch's interpreter teardown would keep it
    # (and, through PDEATHSIG, the workers it forked) alive for seconds with nothing to
    # flush. Forked workers inherit this hook: the pid check leaves them alone.
    if os.getpid() == _FORKSERVER_PID:
        os._exit(0)
