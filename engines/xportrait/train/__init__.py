"""Training X-Portrait (paper sections 3.2-3.4, 4.1): data, control images, stages, loop, export.

data.py (videos -> clips on disk, random access) -> pairs.py (cross-identity control images
I_C = F(I_S' -> I_D), local patches, random scaling) -> dataset.py (a stage's samples) ->
stages.py (what each stage trains and conditions on; the loss of eq. 1) -> causal.py (the
live engine's attention pattern for the causal stage) -> trainer.py (accelerate loop,
checkpoints, validation) -> export.py (the released checkpoint layout).
"""
