"""``adakv-local serve``'s HTTP side: an OpenAI-compatible app over one ``Llama`` with eviction.

:mod:`.app` holds the routes (it needs the server extra: FastAPI, uvicorn); :mod:`.errors` the
error answers. Importing this package imports neither.
"""

from __future__ import annotations

#: the extra field of every completion response (streamed: its last chunk) with the request's stats
STATS_FIELD = "adakv"
