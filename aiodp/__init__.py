"""aiodp: an asyncio-native Kubernetes device plugin for NVIDIA GPUs."""

from aiodp._version import VERSION

__version__ = VERSION
