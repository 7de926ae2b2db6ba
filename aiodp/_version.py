"""Which version this is: the one source for pyproject, the chart, the image and --version."""

VERSION = "0.1.0"
