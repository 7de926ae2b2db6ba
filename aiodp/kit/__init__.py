"""Shared tools: asyncio, retry, inotify, logs, errors, metrics, sockets. May import no aiodp."""
