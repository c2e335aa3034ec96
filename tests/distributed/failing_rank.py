"""``python -m vitcompress`` for a torchrun worker whose rank 1 fails in the fine-tune (test_ddp.py): the real
command line, with rank 1's fine-tune replaced by one that raises."""

import os

from vitcompress.cli import main
from vitcompress.training import loop


def broken(*args, **kwargs):
    raise ValueError("injected failure on this rank")


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        loop.train = broken
    main()
