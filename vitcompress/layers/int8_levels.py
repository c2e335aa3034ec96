"""INT8_LEVELS: how many power-of-two exponents per output channel an int8 weight holds exactly (no torch).

Seven consecutive exponents give ``w_int ∈ {0, ±1, ±2, …, ±64}``; eight would need +128, which int8 cannot hold.
:mod:`vitcompress.layers.int8_linear` builds its layers on it, and the shift transforms' configs validate
``levels`` against it without importing torch.
"""

INT8_LEVELS = 7
