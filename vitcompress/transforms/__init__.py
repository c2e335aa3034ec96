"""Recipe transforms: importing the package registers the built-in ones (:mod:`.registry`)."""

from vitcompress.transforms import lowrank, shift_linear, shiftadd_attention, shiftadd_moe, skip, taylor  # noqa: F401
