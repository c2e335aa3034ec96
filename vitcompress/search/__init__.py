"""The recipe search behind ``vitcompress tune``: space, trials, the Optuna study, seeds, front and its page.

``vitcompress.tune()`` is :func:`vitcompress.search.run.tune` (the package is not named ``tune`` so that the
function keeps the name ``vitcompress.tune``).
"""
