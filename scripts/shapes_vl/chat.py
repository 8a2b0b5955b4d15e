"""The shapes task over the OpenAI chat API: a picture and a question as chat messages, in the
order the model was trained on (the image first)."""

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
