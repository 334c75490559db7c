"""DeepSSM logic: image-to-shape deep learning, free of Qt and MRML.

Compute modules (``shape_model``, ``augment``, ``networks``, ``losses``, ``training``) need only
torch/numpy/scipy. I/O modules (``io``, ``cohort``, ``mesh``, ``predict``) additionally import
SimpleITK and vtk, lazily where possible.

Conventions: images are arrays ``(Z, Y, X)`` as SimpleITK gives them; particles are ``(M, 3)``
float, millimetres, LPS physical space; batches lead.
"""

__version__ = "0.1.0"
