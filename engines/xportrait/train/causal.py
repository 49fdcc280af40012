"""The live engine's temporal attention pattern, laid over a training clip.

The live engine (stream.py) runs M causally: a frame attends over the last W - 1 frames at
its own denoising level (a ring of W slots per level) and, with look-ahead k, over the k
newer frames in flight; positions follow the frames' ages. Which slots attend and at which
positions is decided in one place, `stream.update_ring_tick`, and the k newer frames take
the positions after the current one (`TemporalBlock._attend_ring`).

`live_pattern` runs that very bookkeeping (the function the streaming engine calls each tick,
on tensors of its own, without a model) over the ticks of a clip of F frames and writes down, for each frame, the
frames it attended to and their positions: a `FramePattern`, which the temporal modules
apply to a whole clip in one differentiable pass. Train and serve share the definition; a
test pins the pattern to a real streaming engine's ticks and the trained forward to its frames.
"""

from __future__ import annotations

import torch

from ..stream import StreamSettings, update_ring_tick
from ..temporal import FramePattern, RingTick


def live_pattern(frames: int, window: int, lookahead: int = 0, max_len: int = 24) -> FramePattern:
    """The attention pattern of a streamed clip of `frames` frames (one denoising level)."""
    settings = StreamSettings(steps=1, window=window, lookahead=lookahead)
    settings.validate(max_len)
    k, w = lookahead, window
    entries = k + 1  # k look-ahead entries, then the level
    newer = torch.arange(entries)[:, None] - 1 - torch.arange(k)[None]
    valid = torch.zeros((entries, w), dtype=torch.bool)
    slot = torch.full((1,), w - 1, dtype=torch.long)
    ring_index = torch.arange(w)
    occupied = torch.zeros(entries, dtype=torch.bool)
    t = RingTick(slot, torch.zeros((entries, w), dtype=torch.bool), torch.zeros((entries, w), dtype=torch.long),
                 torch.zeros((entries, k), dtype=torch.bool) if k else None)
    mask = torch.zeros((frames, frames), dtype=torch.bool)
    positions = torch.zeros((frames, frames), dtype=torch.long)
    query_positions = torch.zeros(frames, dtype=torch.long)
    for tick in range(frames + k):
        # StreamingDenoiser._enter: the ring slot advances, every entry moves down one, the new frame enters.
        slot.copy_((slot + 1) % w)
        occupied[1:] = occupied[:-1].clone()
        occupied[:1] = tick < frames
        update_ring_tick(t, valid, occupied, ring_index, newer.clamp(min=0), newer >= 0)
        frame = tick - k  # the frame at the level (entry e holds the frame that entered e ticks ago)
        if frame < 0:
            continue
        current_slot = int(slot)
        for j in range(w):
            if not t.mask[k, j]:
                continue
            age = (current_slot - j) % w  # slot j was written `age` ticks ago, by the frame then at this entry
            positions[frame, frame - age] = t.positions[k, j]
            mask[frame, frame - age] = True
        current = t.positions[k, current_slot]
        query_positions[frame] = current
        for o in range(k):  # entry k - 1 - o holds frame + 1 + o, at the positions after this frame's
            if t.ahead[k, o]:
                mask[frame, frame + 1 + o] = True
                positions[frame, frame + 1 + o] = current + 1 + o
    return FramePattern(mask, positions, query_positions)
