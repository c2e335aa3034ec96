"""``python -m vitcompress.cli``: the command line, as the ``vitcompress`` console script."""

from vitcompress.cli.main import main

if __name__ == "__main__":
    main()
