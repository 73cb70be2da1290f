"""What the tests share besides fixtures: a local multi-node Ray cluster, job runs, generated images, S3 helpers.

conftest.py holds the fixtures and imports from here; test modules import these names from here too.
"""
