"""LPC inside other training libraries: ``lpc.integrations.trl`` (``LPCDPOTrainer``; needs the ``trl`` extra)."""
