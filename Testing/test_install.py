"""First-use installs and resource lookup of the Slicer module (DeepSSMExtension/DeepSSMLib/install.py),
with a fake ``slicer`` module: what is installed, through which API, and what is refused."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepSSMExtension"))

from DeepSSMLib import install  # noqa: E402


def _reqs(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "requirements.txt"
    p.write_text(text)
    return p


def test_requirement_parsing(tmp_path):
    text = "# comment\nscipy>=1.9  # inline\n\n tqdm \nopenpyxl[extra]>=3.0; python_version>'3'\n"
    assert install.read_requirements(_reqs(tmp_path, text)) == [
        "scipy>=1.9",
        "tqdm",
        "openpyxl[extra]>=3.0; python_version>'3'",
    ]
    assert install.requirement_name("openpyxl[extra]>=3.0; python_version>'3'") == "openpyxl"
    assert install.requirement_name("scikit-learn==1.4") == "scikit-learn"
    with pytest.raises(ValueError, match="cannot parse"):
        install.requirement_name(">=1.0")


def test_missing_requirements_checks_installed_distributions():
    assert install.missing_requirements(["numpy>=1.0", "surely-not-installed-pkg-xyz>=1"]) == [
        "surely-not-installed-pkg-xyz>=1"
    ]


def test_shipped_requirements_are_found_and_never_list_slicer_or_pytorch_packages():
    path = install.resource_path("requirements.txt")
    assert path == REPO / "Resources" / "requirements.txt"
    names = [install.requirement_name(r).lower() for r in install.read_requirements(path)]
    assert names and not set(names) & set(install.NEVER_PIP)
    with pytest.raises(FileNotFoundError, match="Resources/nothing-here"):
        install.resource_path("nothing-here")
    assert install.ensure_logic_importable() == REPO


def _fake_slicer(monkeypatch, with_pip_ensure: bool) -> dict:
    calls: dict = {"pip_install": [], "pip_ensure": []}
    slicer = types.ModuleType("slicer")
    slicer.util = types.SimpleNamespace(pip_install=lambda reqs: calls["pip_install"].append(list(reqs)))
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    # ``import slicer.packaging`` finds a submodule through sys.modules, as Slicer's real one is.
    monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
    if with_pip_ensure:
        packaging = types.ModuleType("slicer.packaging")
        packaging.load_requirements = lambda path: ("loaded", path)
        packaging.pip_ensure = lambda reqs, requester: calls["pip_ensure"].append((reqs, requester))
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    return calls


def test_ensure_requirements_installs_only_what_is_missing(tmp_path, monkeypatch):
    calls = _fake_slicer(monkeypatch, with_pip_ensure=False)
    asked = []
    f = _reqs(tmp_path, "numpy-not-really-xyz>=1\nscipy\n")
    install.ensure_requirements(f, requester="T", confirm=lambda msg: asked.append(msg) or True)
    assert calls["pip_install"] == [["numpy-not-really-xyz>=1"]]
    assert "T needs these Python packages: numpy-not-really-xyz>=1" in asked[0]
    # declined: nothing installed, a clear error
    with pytest.raises(RuntimeError, match="required packages not installed: numpy-not-really-xyz"):
        install.ensure_requirements(f, requester="T", confirm=lambda msg: False)
    assert len(calls["pip_install"]) == 1
    # all present: slicer is not even touched
    install.ensure_requirements(_reqs(tmp_path, "scipy\n"), confirm=lambda m: pytest.fail("asked"))


def test_ensure_requirements_uses_pip_ensure_on_new_slicer(tmp_path, monkeypatch):
    calls = _fake_slicer(monkeypatch, with_pip_ensure=True)
    f = _reqs(tmp_path, "absent-pkg-xyz\n")
    install.ensure_requirements(f, requester="DeepSSM")
    assert calls["pip_ensure"] == [(("loaded", str(f)), "DeepSSM")] and calls["pip_install"] == []


@pytest.mark.parametrize("pkg", ["torch>=2", "SimpleITK", "numpy"])
def test_ensure_requirements_refuses_packages_slicer_provides(tmp_path, monkeypatch, pkg):
    calls = _fake_slicer(monkeypatch, with_pip_ensure=True)
    with pytest.raises(RuntimeError, match="must not list"):
        install.ensure_requirements(_reqs(tmp_path, f"{pkg}\n"))
    assert calls == {"pip_install": [], "pip_ensure": []}


def test_ensure_torch(monkeypatch):
    import torch

    assert install.ensure_torch() is torch  # installed: imported, nothing installed
    real_find_spec = install.importlib.util.find_spec

    def no_torch(name, *a):
        return None if name == "torch" else real_find_spec(name, *a)

    monkeypatch.setattr(install.importlib.util, "find_spec", no_torch)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the extension is not installed
    with pytest.raises(RuntimeError, match="install the 'PyTorch' extension"):
        install.ensure_torch()
    asked = []

    class Logic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            asked.append((askConfirmation, torchVersionRequirement))
            return None

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    with pytest.raises(RuntimeError, match="PyTorch was not installed"):
        install.ensure_torch(ask_confirmation=False)
    assert asked == [(False, install.TORCH_REQUIREMENT)]
    assert install.gpu_names() == []  # find_spec says no torch: no import, no GPU names
