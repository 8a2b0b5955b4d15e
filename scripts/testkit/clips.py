"""Generated video clips for tests and load tests: every frame different and easy to tell apart
(a colour ramp and bars that move with the frame number), encoded in memory with PyAV."""

from __future__ import annotations

import io

import numpy as np

# container format and pixel format of each codec's clips
_FORMATS = {
    "libx264": ("mp4", "yuv420p"),  # sides must be even
    "libvpx-vp9": ("webm", "yuv420p"),
    "gif": ("gif", "rgb8"),
    "mpeg4": ("mp4", "yuv420p"),
}


def frame(index: int, width: int, height: int) -> np.ndarray:
    """The index-th frame: uint8 [height, width, 3]."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :, 0] = (index * 23) % 256
    img[: max(1, height // 2), :, 1] = (index * 41 + 60) % 256
    bar = (index * 3) % max(1, width)
    img[:, bar : bar + max(1, width // 8), 2] = 255
    return img


def encode_clip(
    frames: list[np.ndarray] | np.ndarray,
    fps: float,
    codec: str = "libx264",
    gop: int | None = None,
) -> bytes:
    """The frames as a video file (mp4, webm or gif by codec)."""
    import av

    fmt, pix_fmt = _FORMATS[codec]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=_rate(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        for picture in frames:
            for packet in stream.encode(_video_frame(picture, pix_fmt)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _video_frame(picture: np.ndarray, pix_fmt: str):
    """An RGB picture as the encoder's frame. Even-sized yuv420p is converted here (BT.601,
    limited range): libswscale's conversion, which PyAV would run, now and then gives other
    bytes for the same picture, and seeded clips must be the same file every time."""
    import av

    height, width = picture.shape[:2]
    if pix_fmt != "yuv420p" or height % 2 or width % 2:
        return av.VideoFrame.from_ndarray(picture, format="rgb24")
    r, g, b = (picture[..., c].astype(np.float32) for c in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255

    def half(c: np.ndarray) -> np.ndarray:
        return c.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    chroma = np.concatenate([half(u), half(v)]).reshape(height // 2, width)
    planes = np.concatenate([y, chroma]).round().clip(0, 255).astype(np.uint8)
    return av.VideoFrame.from_ndarray(planes, format="yuv420p")


def _rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def make_clip(
    num_frames: int,
    width: int,
    height: int,
    fps: float,
    codec: str = "libx264",
    gop: int | None = None,
) -> bytes:
    """A generated clip of num_frames frames."""
    return encode_clip([frame(i, width, height) for i in range(num_frames)], fps, codec, gop)


def make_plain_clip(seconds: float, width: int, height: int, fps: float, gop: int = 48) -> bytes:
    """A long or large h264 clip made cheaply: grey frames with a band whose level follows the
    frame number, written as YUV (no colour conversion) with x264's fastest preset."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=_rate(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        stream.codec_context.gop_size = gop
        planes = np.full((height * 3 // 2, width), 128, np.uint8)
        for i in range(round(seconds * fps)):
            planes[: min(64, height), :] = (i * 9) % 256
            picture = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            for packet in stream.encode(picture):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def no_frames() -> bytes:
    """A webm whose header declares a video stream that holds no frame."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:
        stream = out.add_stream("libvpx-vp9", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        out.start_encoding()
    return buf.getvalue()


def audio_only(seconds: float = 1.0) -> bytes:
    """An m4a file with a tone and no video stream."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = int(16000 * seconds)
        tone = (np.sin(np.arange(samples) * 0.1) * 0.2).astype(np.float32)[None]
        for start in range(0, samples, 1024):
            chunk = av.AudioFrame.from_ndarray(
                tone[:, start : start + 1024], format="fltp", layout="mono"
            )
            chunk.sample_rate = 16000
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
