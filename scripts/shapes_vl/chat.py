"""The shapes task over the OpenAI chat API: a picture (or an mp4 clip) and a question as chat
messages, in the order the model was trained on (the image or clip first)."""

from __future__ import annotations

import base64
import io


def png_data_url(image) -> str:
    """A PIL image as a base64 PNG data URL."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(image, question: str) -> list[dict]:
    """One user turn: the image, then the question."""
    parts = [
        {"type": "image_url", "image_url": {"url": png_data_url(image)}},
        {"type": "text", "text": question},
    ]
    return [{"role": "user", "content": parts}]


def video_messages(data: bytes, question: str) -> list[dict]:
    """One user turn: the clip's mp4 bytes as a `video_url` data URL, then the question."""
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    parts = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": parts}]
