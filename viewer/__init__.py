"""atomsplat viewer: the live GGUI window over a running fit (reads the engine's model; the engine
never imports the viewer)."""
