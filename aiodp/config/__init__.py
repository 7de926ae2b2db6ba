"""What the operator asked: flags, env, NVIDIA's file, per-node config. May import kit."""
