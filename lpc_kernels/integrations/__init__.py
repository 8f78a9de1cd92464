"""Our kernels inside other libraries' training loops: ``lpc_kernels.integrations.trl`` (TRL's fused LM head)."""
