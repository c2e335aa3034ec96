"""Tests of vitcompress batch: manifests, runs, caches, shards, the example workflows."""
