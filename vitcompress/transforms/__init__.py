"""Recipe transforms: importing the package registers the built-in ones (:mod:`.registry`)."""

from vitcompress.transforms import (  # noqa: F401
    lowrank,
    shift_linear,
    shiftadd_attention,
    shiftadd_moe,
    skip,
    taylor,
    token_merge,
)
