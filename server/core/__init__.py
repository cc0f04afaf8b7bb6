"""The core: frozen backbone, per-task module kinds, the functional forward, slot pools, the engine."""
