"""Re-encode one source video into the small H.264 mp4 that a shard stores.

Runs in a worker process (local pool or Ray task): it returns bytes and a record, or a
reason why the input cannot be packed. It never raises for bad input, because one corrupt
file among millions must cost one line in ``rejects.jsonl``, not the run.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from dclr_dist import storage
from dclr_dist.config import ShardConfig

# The same frames make the same mp4 bytes, on any machine (shards here, the synthetic corpus
# in synth.py): resumed packing and byte-identical corpora rely on it.
# +bitexact keeps library versions and timestamps out of the container.
MP4_BITEXACT = {"fflags": "+bitexact"}


def deterministic_x264(stream, *, crf: int, preset: str, gop: int, tune: str | None = None) -> None:
    """Set a ``libx264`` output stream to encode deterministically: quality ``crf`` at
    ``preset``, a keyframe exactly every ``gop`` frames (no scene-cut keyframes), ``tune``
    if given. Open the container with ``options=dict(MP4_BITEXACT)``."""
    # One thread per encode: x264's output depends on its thread count, which would make
    # output differ between machines; parallelism comes from encoding many videos at once.
    # mbtree=0: with macroblock-tree rate control, x264's SIMD lookahead reads uninitialised
    # memory and one encode in ten to fifty differed, depending on what the process had
    # allocated before (measured: 40 of 40 identical without it); it costs a few % size.
    stream.codec_context.thread_count = 1
    options = {
        "crf": str(crf),
        "preset": preset,
        "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:threads=1:mbtree=0",
    }
    if tune is not None:
        options["tune"] = tune
    stream.options = options


@dataclass
class Encoded:
    mp4: bytes
    sha256: str  # of the source file, so a record can be traced back to its exact input
    fps: float
    frames: int
    width: int
    height: int
    duration: float
    # Frames decoded before the source broke off; the record says so instead of hiding it.
    partial: str | None = None


@dataclass
class Rejected:
    reason: str
    # A cause that may pass (storage unreachable or throttled, a read that hung): not a verdict
    # on the input, so the packing stops there and the next run tries it again.
    passing: bool = False


# Image formats that may hold an animation: one frame in them is a still image.
_ANIMATED_IMAGE = ("gif", "apng", "webp")


def _output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    # Every sample gets the same short side (upscaling small sources too), so the loader's
    # crops see one scale; sizes stay even because yuv420p needs it.
    scale = short_side / min(width, height)

    def even(x: float) -> int:
        return max(2, int(round(x / 2)) * 2)

    return even(width * scale), even(height * scale)


def _hash_source(source: str) -> tuple[str, io.BytesIO | str]:
    """sha256 of the source, and what to hand to PyAV (a path, or the bytes of an S3 object)."""
    digest = hashlib.sha256()
    if storage.is_s3(source):
        data = storage.read_bytes(source)
        digest.update(data)
        return digest.hexdigest(), io.BytesIO(data)
    path = storage.local_path(source)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest(), str(path)


def _zero_padding(frame: av.VideoFrame) -> None:
    """Zero the bytes past each plane's visible width and height.

    FFmpeg leaves that line padding uninitialised and x264's SIMD code reads some of it, so
    the same video could encode to different bytes depending on what the heap held before.
    Shards must be reproducible (resume relies on it).
    """
    for plane in frame.planes:
        rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        rows[:, plane.width :] = 0
        rows[plane.height :] = 0


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def input_identity(source: str) -> list[int] | None:
    """``[size, mtime_ns]`` of a local regular file, else None: what resume compares to notice
    that an input changed since it was packed. S3 sources are not stat'ed (one request each)."""
    if storage.is_s3(source):
        return None
    try:
        st = os.stat(storage.local_path(source))
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


def _check_local(path: str) -> Rejected | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return Rejected(f"file not found: a broken symbolic link (to {os.readlink(path)})")
        return Rejected("file not found")
    except OSError as e:
        return Rejected(f"unreadable: {e.strerror or e}")
    # Opening a FIFO or a device would block or read forever; none of them holds a video file.
    if not stat.S_ISREG(st.st_mode):
        return Rejected(f"not a regular file: {_kind(st.st_mode)}")
    if st.st_size == 0:
        return Rejected("empty file (0 bytes)")
    return None


def transcode(source: str, cfg: ShardConfig) -> Encoded | Rejected:
    if not storage.is_s3(source):
        problem = _check_local(str(storage.local_path(source)))
        if problem is not None:
            return problem
    try:
        sha, handle = _hash_source(source)
    except FileNotFoundError:
        return Rejected("file not found")
    except (PermissionError, IsADirectoryError) as e:
        return Rejected(f"unreadable: {e.strerror or e}")
    except OSError as e:  # S3 unreachable, throttled past retries, a token expired; EIO on a mount
        return Rejected(f"unreadable: {e if isinstance(e, storage.StorageError) else e.strerror or e}", passing=True)
    try:
        container = av.open(handle, metadata_errors="ignore")
    except av.error.FFmpegError as e:
        return Rejected(f"not a readable video container: {e}")
    try:
        return _reencode(container, sha, cfg)
    finally:
        container.close()


def _reencode(container, sha: str, cfg: ShardConfig) -> Encoded | Rejected:
    if not container.streams:
        # FFmpeg drops tracks without samples, so a zero-frame mp4 looks like this.
        return Rejected("no video frames: the container holds no streams")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        return Rejected(f"no video stream (found: {', '.join(kinds)})")
    fmt = container.format.name
    # FFmpeg demuxes a still image as a 1-frame video (image2, or png_pipe, jpeg_pipe and the
    # other *_pipe image demuxers it picks by content, whatever the file's extension).
    if fmt in ("image2", "image2pipe") or fmt.endswith("_pipe"):
        return Rejected(f"not a video: a still image ({fmt})")
    stream = container.streams.video[0]
    src_rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not src_rate or src_rate <= 0:
        return Rejected("video stream has no frame rate")
    src_rate = Fraction(src_rate)
    out_rate = src_rate if cfg.fps is None or cfg.fps >= src_rate else Fraction(cfg.fps).limit_denominator(1001)
    ctx = stream.codec_context
    if not ctx.width or not ctx.height:
        return Rejected("video stream has no frame size")

    buf = io.BytesIO()
    out = av.open(buf, mode="w", format="mp4", options=dict(MP4_BITEXACT))
    vout = out.add_stream("libx264", rate=out_rate)
    vout.pix_fmt = "yuv420p"
    vout.codec_context.gop_size = cfg.gop
    deterministic_x264(vout, crf=cfg.crf, preset=cfg.preset, gop=cfg.gop, tune=cfg.tune)

    frames = _encode_frames(container, stream, out, vout, out_rate, cfg)
    if isinstance(frames, Rejected):
        return frames
    written, seen, partial = frames
    width, height = vout.width, vout.height
    if written == 0:
        out.close()
        return Rejected("zero decodable video frames")
    if seen == 1 and (fmt in _ANIMATED_IMAGE or not container.duration and not stream.duration):
        # A still image in a format that can also animate; a real 1-frame video has a duration.
        out.close()
        return Rejected(f"not a video: a single frame in {fmt} (a still image)")
    for packet in vout.encode(None):
        out.mux(packet)
    out.close()
    return Encoded(
        mp4=buf.getvalue(),
        sha256=sha,
        fps=float(out_rate),
        frames=written,
        width=width,
        height=height,
        duration=written / float(out_rate),
        partial=partial,
    )


def _encode_frames(
    container, stream, out, vout, out_rate: Fraction, cfg: ShardConfig
) -> tuple[int, int, str | None] | Rejected:
    """Encode ``stream``'s frames into ``vout`` upright and on its clock; return (written, decoded,
    partial), or a Rejected if none decoded.

    Upright: a phone's portrait video is stored sideways with a display rotation; the frames
    are turned as a player would, so the direction of motion is the one a person sees. On its
    clock: output frame n shows the source frame on screen at n / out_rate, so a
    variable-frame-rate source keeps its local speed (frames dropped where it runs faster
    than out_rate, repeated where slower); a constant-rate source at out_rate keeps each frame.
    """
    frame_tb = 1 / out_rate
    written = seen = 0
    start = turns = size = previous = None
    partial = None
    limit = math.inf if cfg.max_seconds is None else cfg.max_seconds
    try:
        for frame in container.decode(stream):
            seen += 1
            t = frame.time if frame.time is not None else written / float(out_rate)
            start = t if start is None else start
            t -= start
            if t >= limit:
                break
            slot = t * out_rate
            # Half a slot of tolerance: container clocks round timestamps (to ms in many mp4s).
            if slot <= written - 0.5:
                continue
            if turns is None:  # the first frame decides, for the whole video
                turns = round((frame.rotation or 0) / 90) % 4
                upright = (frame.width, frame.height) if turns % 2 == 0 else (frame.height, frame.width)
                vout.width, vout.height = _output_size(*upright, cfg.short_side)
                size = (vout.width, vout.height) if turns % 2 == 0 else (vout.height, vout.width)
            img = _upright(frame, size, turns)
            while previous is not None and slot > written + 0.5:  # a gap: the last frame stays on screen
                written = _encode(out, vout, previous, written, frame_tb)
            written = _encode(out, vout, img, written, frame_tb)
            previous = img
    except av.error.FFmpegError as e:
        if written == 0:
            out.close()
            return Rejected(f"undecodable video stream: {e}")
        partial = f"decoding stopped after {written} frames: {e}"
    return written, seen, partial


def _upright(frame: av.VideoFrame, size: tuple[int, int], turns: int) -> av.VideoFrame:
    """``frame`` scaled to ``size`` (stored orientation) and turned ``turns`` x 90 degrees counter-clockwise."""
    if turns == 0:
        return frame.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="AREA", threads=1)
    rgb = frame.reformat(width=size[0], height=size[1], format="rgb24", interpolation="AREA", threads=1)
    turned = np.ascontiguousarray(np.rot90(rgb.to_ndarray(), turns))
    return av.VideoFrame.from_ndarray(turned, format="rgb24").reformat(format="yuv420p", threads=1)


def _encode(out, vout, img: av.VideoFrame, written: int, frame_tb: Fraction) -> int:
    """Mux ``img`` as output frame ``written``; returns the next frame's index."""
    _zero_padding(img)
    # Timestamps count output frames: a constant rate, the source's clock already followed.
    img.pts = written
    img.time_base = frame_tb
    for packet in vout.encode(img):
        out.mux(packet)
    return written + 1
