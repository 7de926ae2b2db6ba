"""The device plugin: service, registration, generations. May import ops and below; not dra."""
