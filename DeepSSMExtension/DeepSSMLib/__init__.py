"""Qt-free library behind the DeepSSM Slicer module.

- :mod:`.mrml`: MRML adapters (volume <-> SimpleITK, particles <-> point lists, meshes, heatmaps,
  colour legends, tables, plots); slicer-core safe.
- :mod:`.runner`: background process runner with a Protocol seam (JSON-lines progress, cancel).
- :mod:`.worker`: the script the runner launches (predict / train).
- :mod:`.install`: finding DeepSSMLogic and resources, installing requirements at first use.
- :mod:`.bundles`: recent bundles, the demo bundle and the sample-data manifest.
- :mod:`.controller`: the module logic without Qt (tasks, result nodes, analyses, explorer).
- :mod:`.explorer`: the shape-model explorer (mean surface warped along the leading modes).
- :mod:`.analysis`: the Analysis panel's computations (group difference, swim, severity).
"""

from .install import ensure_logic_importable

ensure_logic_importable()
