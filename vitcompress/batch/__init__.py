"""Batch conversion for CI: a manifest of models × recipes, each job an isolated ``convert`` process.

- :mod:`~vitcompress.batch.manifest`: the strict manifest schema and its expansion into jobs;
- :mod:`~vitcompress.batch.keys`: content keys (cache hits, resume, why a job missed);
- :mod:`~vitcompress.batch.runner`: process groups, timeouts, thread budget, the latency lock;
- :mod:`~vitcompress.batch.gates`: gates and metrics from each job's report.json;
- :mod:`~vitcompress.batch.results`: ``batch.json`` and the exit code;
- :mod:`~vitcompress.batch.outputs`: ``junit.xml``, ``summary.md``, GitHub annotations;
- :mod:`~vitcompress.batch.baseline` and :mod:`~vitcompress.batch.merge`: regressions and CI shards.

Only the CLI imports this package; it runs the pipeline through subprocesses, never through ``api``.
"""
