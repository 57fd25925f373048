"""What is estimated from the measured data before any fit: the data model (background, scale,
noise, hot pixels, counts gain) and the alignment (pre-alignment, its files)."""
