"""``python jobs/nightly.py``: the job ``cxr.jobs.nightly`` (installed as the command ``cxr-nightly``) run from a
checkout, also under ``ray job submit --working-dir .``. Options: ``python jobs/nightly.py --help``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from cxr.jobs.nightly import main, parse_args, run

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    run()
