"""Image bytes from a request: inline data, a data: URL, or (when enabled) an http(s) URL fetched
under the public-address policy both services share (`shared.wire.fetch`)."""

from __future__ import annotations

from urllib.parse import urlsplit

from shared.wire.dataurl import IMAGE_TYPES, DataURLError, decode_data_url
from shared.wire.fetch import FetchError, FetchPolicy, SafeFetcher


class ImageSourceError(ValueError):
    """An image reference cannot be turned into bytes (bad URL, fetch failure, too large)."""


class ImageSources:
    """Turns an image URL into bytes: data: URLs always, http(s) only when `allow_http`."""

    def __init__(
        self, policy: FetchPolicy, allow_http: bool, media_types: tuple[str, ...] = IMAGE_TYPES
    ) -> None:
        self.policy = policy
        self.allow_http = allow_http
        self.media_types = media_types
        self._fetcher = SafeFetcher(policy)

    async def load(self, url: str) -> bytes:
        scheme = urlsplit(url).scheme.lower()
        try:
            if scheme == "data":
                return decode_data_url(url, self.policy.max_bytes, self.media_types)
            if scheme not in ("http", "https"):
                raise ImageSourceError(
                    f"unsupported URL scheme {scheme!r}; use data:, http: or https:"
                )
            if not self.allow_http:
                raise ImageSourceError(
                    "this encode service does not fetch http(s) URLs (start it with "
                    "--allow-url-fetch); send the image bytes instead"
                )
            return await self._fetcher.fetch(url)
        except (DataURLError, FetchError) as exc:
            raise ImageSourceError(str(exc)) from exc
