"""The stages of a conversion, one file each, each a ``run(ctx)`` on the run's
:class:`~vitcompress.context.RunContext`, in the order :data:`vitcompress.api.STAGES` runs them:

``load`` → ``transform`` → ``finetune`` → ``export`` → ``validate`` → ``ladder`` → ``cascade`` → ``profile`` →
``report`` → ``bundle`` → ``page``

A stage imports no other stage: what two stages share is library code (:mod:`vitcompress.pipeline`,
:mod:`vitcompress.evaluate`, :mod:`vitcompress.measure`, :mod:`vitcompress.training`), see docs/architecture.md.
"""
