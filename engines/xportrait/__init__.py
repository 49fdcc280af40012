"""The X-Portrait diffusion engine (paper: X-Portrait, SIGGRAPH 2024).

config.py (sizes) -> temporal.py, reference.py, unet.py (modules) -> model.py (the model) ->
pipeline.py (offline sampling), stream.py (live sampling: the stream batch) -> offline.py,
live.py (the two engines, over runtime.py); weights/ (loading).
"""
