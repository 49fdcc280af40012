"""Sample media made in code: the gallery of bundled portraits (`gallery`) and the synthetic
puppet that turns a portrait into a driving clip with known ground truth (`puppet`).
Files are written with `streamer.video.write_video`."""

from .gallery import PORTRAITS, portrait
from .puppet import (
    DEFAULT_SCRIPT_SECONDS,
    FACE_ANCHOR,
    FACE_FRACTION,
    SCRIPT_SEGMENTS,
    Pose,
    Puppet,
    Script,
    default_script,
    driving_clip,
    puppet,
)

__all__ = ["PORTRAITS", "portrait", "Pose", "Script", "SCRIPT_SEGMENTS", "DEFAULT_SCRIPT_SECONDS",
           "default_script", "Puppet", "puppet", "driving_clip", "FACE_FRACTION", "FACE_ANCHOR"]
