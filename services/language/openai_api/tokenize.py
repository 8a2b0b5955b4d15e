"""vLLM's utility routes: POST /tokenize, POST /detokenize, GET /version.

`/tokenize` with messages renders them exactly as a chat request would (template, tools,
`chat_template_kwargs`) and counts each image's tokens from its size with the encode service's
resize rule (`smart_resize` within the request's pixel limits): images are loaded but never
encoded, so counting is cheap and needs no encode replica. The count equals the
`usage.prompt_tokens` of the same chat request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from importlib import metadata

from fastapi import FastAPI

from services.language.errors import BadRequestError
from services.language.frontend.pipeline import ChatInput, LanguageFrontend
from services.language.openai_api.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    chat_messages,
)


def _version() -> str:
    try:
        return metadata.version("splitvl")
    except metadata.PackageNotFoundError:
        return "unknown"


def add_tokenize_routes(
    app: FastAPI,
    frontend: LanguageFrontend,
    check_model: Callable[[str | None], None],
    warn_unknown: Callable[[list[str]], None],
) -> None:
    """Register /tokenize, /detokenize and /version on `app`."""
    tokenizer = frontend.engine.tokenizer
    version = _version()

    def token_strs(tokens: list[int]) -> list[str]:
        return [tokenizer.tokenizer.id_to_token(t) or "" for t in tokens]

    @app.post("/tokenize")
    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest) -> dict:
        warn_unknown(body.unknown_fields())
        check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            kwargs = body.mm_processor_kwargs
            pixels = frontend.options.images.pixel_limits(kwargs)
            video = frontend.options.videos.options(kwargs)
            chat = ChatInput(body.render_options(), pixels, video=video)
            tokens = await frontend.count_chat(chat_messages(body.messages), chat)
        else:
            tokens = await asyncio.to_thread(tokenizer.encode, body.prompt, body.add_special_tokens)
        return {
            "count": len(tokens),
            "max_model_len": frontend.window.max_model_len,
            "tokens": tokens,
            "token_strs": token_strs(tokens) if body.return_token_strs else None,
        }

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        warn_unknown(body.unknown_fields())
        check_model(body.model)
        vocab = frontend.engine.model_config.text.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise BadRequestError(f"tokens must be token ids in [0, {vocab})", param="tokens")
        text = await asyncio.to_thread(tokenizer.decode, body.tokens, False)
        return {"prompt": text}

    @app.get("/version")
    async def get_version() -> dict:
        return {"version": version}
