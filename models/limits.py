"""Bounds on the zoo's arguments that no one means to exceed: beyond them a factory would build
layers until memory runs out."""

#: the most layers (or blocks) a zoo model may have
MAX_DEPTH = 10_000
