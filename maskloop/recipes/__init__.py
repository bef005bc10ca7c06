"""Training recipes, one readable file each: sft, loop1, loop2, dual."""

from maskloop.recipes import dual, loop1, loop2, sft

RECIPES = {
    "sft": (sft.SFT, sft.STREAMS, sft.DEFAULTS),
    "loop1": (loop1.Loop1, loop1.STREAMS, loop1.DEFAULTS),
    "loop2": (loop2.Loop2, loop2.STREAMS, loop2.DEFAULTS),
    "dual": (dual.Dual, dual.STREAMS, dual.DEFAULTS),
}
