"""The GPU core: backends, devices, sharing, health, edits, live plan. May import config, kit."""
