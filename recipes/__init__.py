"""The recipes shipped with vitcompress: YAML files, installed as the package data of ``vitcompress.recipes``
(pyproject maps this top-level folder to it) and found by name: ``--recipe svd``."""
