"""Session-wide test settings (owned by the lead; add fixtures in your own module, not here)."""

import os

# Offscreen VTK rendering without a display: Mesa EGL (see docs/ and the environment notes).
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
