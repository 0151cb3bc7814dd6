"""Calibration data to activations: render the safety and user data with the model's chat template
(render), under other system prompts if asked (templates), capture per-Linear inputs and Hessians
layer by layer (capture), keep them on disk per model and data (cache), and leave out user data the
aligned model refuses (screening)."""
