"""Stand-ins (kubelet, pod-resources), testbed and demo; not the product. May import app."""
