"""Locating DeepSSMLogic and the resources, and installing Python requirements at first use.

Two layouts are supported:

- source tree (developer adds ``<repo>/DeepSSMExtension`` to Slicer's module paths):
  ``<repo>/DeepSSMExtension/DeepSSM.py``, ``<repo>/DeepSSMLogic/``, ``<repo>/Resources/``;
- packaged extension (built with CMake): everything side by side in ``qt-scripted-modules/``:
  ``DeepSSM.py``, ``DeepSSMLib/``, ``DeepSSMLogic/``, ``Resources/``.

Nothing here installs anything at import time: Slicer's extension review forbids it, and the
generic module test instantiates the widget without network access. Installs happen only when
the user presses a button that needs the package (``ensure_*`` functions).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent  # the folder holding DeepSSM.py

#: Packages that must never be pip-installed into Slicer (they come with Slicer or PyTorch).
NEVER_PIP = ("torch", "torchvision", "simpleitk", "vtk", "numpy")
TORCH_REQUIREMENT = ">=2.1"


def candidate_roots() -> list[Path]:
    """Directories that may hold ``DeepSSMLogic`` and ``Resources``: packaged, then source."""
    return [MODULE_DIR, MODULE_DIR.parent]


def ensure_logic_importable() -> Path:
    """Put the directory holding ``DeepSSMLogic`` on ``sys.path`` if needed; returns it."""
    spec = importlib.util.find_spec("DeepSSMLogic")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent.parent
    for root in candidate_roots():
        if (root / "DeepSSMLogic" / "__init__.py").is_file():
            sys.path.insert(0, str(root))
            importlib.invalidate_caches()
            return root
    raise ImportError(
        "DeepSSMLogic not found next to the DeepSSM module (looked in "
        + ", ".join(str(r) for r in candidate_roots())
        + "); reinstall the extension"
    )


def resource_path(relative: str) -> Path:
    """Absolute path of ``Resources/<relative>`` in either layout (the first that exists)."""
    for root in candidate_roots():
        p = root / "Resources" / relative
        if p.exists():
            return p
    raise FileNotFoundError(f"DeepSSM resource not found: Resources/{relative}")


def module_icon_path() -> Path | None:
    """``Resources/Icons/DeepSSM.png`` in either layout, None when not shipped."""
    try:
        return resource_path("Icons/DeepSSM.png")
    except FileNotFoundError:
        return None


# -- requirements ---------------------------------------------------------------------------------
_REQ_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;#]*)")


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements.txt (comments and blanks dropped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def requirement_name(requirement: str) -> str:
    m = _REQ_RE.match(requirement)
    if not m:
        raise ValueError(f"cannot parse the requirement {requirement!r}")
    return m.group(1)


def missing_requirements(requirements: list[str]) -> list[str]:
    """Those of ``requirements`` whose distribution is not installed (version specifiers are
    left to pip; this is the cheap metadata check done before offering an install)."""
    missing = []
    for req in requirements:
        try:
            importlib.metadata.version(requirement_name(req))
        except importlib.metadata.PackageNotFoundError:
            missing.append(req)
    return missing


def ensure_requirements(
    requirements_file: str | Path | None = None,
    requester: str = "DeepSSM",
    confirm: Callable[[str], bool] | None = None,
) -> None:
    """Install what ``Resources/requirements.txt`` lists and is missing, inside Slicer.

    Slicer >= 5.12: ``slicer.packaging.pip_ensure`` (asks, shows progress, skips in --testing).
    Older Slicer: ``slicer.util.pip_install`` after ``confirm(message)``.
    """
    path = Path(requirements_file) if requirements_file else resource_path("requirements.txt")
    reqs = read_requirements(path)
    bad = [r for r in reqs if requirement_name(r).lower() in NEVER_PIP]
    if bad:
        raise RuntimeError(f"{path}: must not list {bad} (they come with Slicer / the PyTorch extension)")
    missing = missing_requirements(reqs)
    if not missing:
        return
    import slicer

    try:
        # a submodule: a plain `import slicer` does not load it (as the 5.12 module template does)
        import slicer.packaging as packaging
    except ImportError:  # Slicer < 5.12
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        # pip_ensure takes packaging.Requirement objects, re-checks versions, skips under --testing
        packaging.pip_ensure(packaging.load_requirements(str(path)), requester=requester)
        return
    if confirm is not None and not confirm(
        f"{requester} needs these Python packages: {', '.join(missing)}. Install?"
    ):
        raise RuntimeError(f"{requester}: required packages not installed: {', '.join(missing)}")
    slicer.util.pip_install(missing)


def ensure_torch(ask_confirmation: bool = True) -> object:
    """Import torch, installing it through the PyTorch extension (PyTorchUtils) if needed.

    Never pip-installs torch directly: the PyTorch extension picks the CUDA build that matches
    the machine. Raises RuntimeError with what to do when it is not available.
    """
    if importlib.util.find_spec("torch") is None:
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(
                "DeepSSM needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, "
                "restart Slicer, then try again"
            ) from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=ask_confirmation, torchVersionRequirement=TORCH_REQUIREMENT
        )
        if torch is None:
            raise RuntimeError("PyTorch was not installed; DeepSSM cannot run without it")
        return torch
    import torch

    return torch


def gpu_names() -> list[str]:
    """Names of the CUDA GPUs torch sees (empty without torch or without a GPU). Imports torch
    only if it is already installed, never installs it."""
    if importlib.util.find_spec("torch") is None:
        return []
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken CUDA driver must not break the GUI
        return []
