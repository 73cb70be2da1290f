"""``python jobs/table.py``: the job ``cxr.jobs.table`` (installed as the command ``cxr-table``) run from a
checkout, also under ``ray job submit --working-dir .``. Options: ``python jobs/table.py --help``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from cxr.jobs.table import main, parse_args, run

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    run()
