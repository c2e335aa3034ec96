"""``python -m vitcompress``: the command line."""

from vitcompress.cli import main

if __name__ == "__main__":
    main()
