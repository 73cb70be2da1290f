"""The jobs' command lines: one module per job, each with ``parse_args``, ``main`` (returns the exit code) and ``run``
(the console command ``cxr-<job>``). ``jobs/<job>.py`` in the repository is a thin shim over the same ``main``, for
``python jobs/<job>.py`` and ``ray job submit --working-dir . -- python jobs/<job>.py``. (score and nightly still
keep their parser and main in ``jobs/``; they move here once the table-format work on them has landed.)
"""
