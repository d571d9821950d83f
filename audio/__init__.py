"""The audio layer: frames, files, resampling, framing, devices and DSP.

It sits below ``pipeline/`` and ``assistant/`` and imports neither: the
pipeline's stages and the application both take their audio from here.
"""
