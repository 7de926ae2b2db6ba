"""The operator's view: status, probes, pods, node signals. May import gpus, config, kit, gen."""
