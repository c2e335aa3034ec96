"""``python -m vitcompress``: the command line, as the ``vitcompress`` console script (used by batch jobs)."""

from vitcompress.cli import main

if __name__ == "__main__":
    main()
