"""The DRA driver: task, services, claims, slices. May import ops and below; not deviceplugin."""
