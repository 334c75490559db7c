"""DeepSSM.py and Resources/UI/DeepSSM.ui agree (DeepSSM.py needs the Slicer app: parsed, not imported).

- every ``self.ui.<name>`` the code uses is a widget in the .ui;
- every named widget in the .ui is used by the code or bound to the parameter node;
- every ``SlicerParameterName`` is a field of the ``@parameterNodeWrapper`` class, and every field
  has a widget;
- the module file is valid Python for Slicer 5.12's Python and keeps the template's structure.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "DeepSSMExtension" / "DeepSSM.py"
UI = REPO / "Resources" / "UI" / "DeepSSM.ui"
ROOT_WIDGET = "DeepSSM"
# plain containers the code need not touch (named for Designer; not inputs)
CONTAINER_CLASSES = {"ctkCollapsibleButton"}


def _tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"), filename=str(MODULE))


def ui_widgets() -> dict[str, tuple[str, str | None]]:
    """name -> (class, SlicerParameterName or None) for every named widget."""
    out = {}
    for w in ET.parse(UI).getroot().iter("widget"):
        name = w.get("name")
        if not name:
            continue
        param = None
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                param = prop.findtext("string")
        out[name] = (w.get("class"), param)
    return out


def code_ui_names() -> set[str]:
    """Attributes read as ``self.ui.<name>`` in DeepSSM.py."""
    names = set()
    for node in ast.walk(_tree()):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def parameter_fields() -> set[str]:
    for node in ast.walk(_tree()):
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in DeepSSM.py")


def test_every_widget_the_code_uses_exists_in_the_ui():
    missing = code_ui_names() - set(ui_widgets())
    assert not missing, f"DeepSSM.py uses widgets that DeepSSM.ui lacks: {sorted(missing)}"


def test_every_ui_widget_is_used_or_bound():
    used = code_ui_names()
    unused = [
        name
        for name, (cls, param) in ui_widgets().items()
        if name != ROOT_WIDGET and cls not in CONTAINER_CLASSES and param is None and name not in used
    ]
    assert not unused, f"DeepSSM.ui widgets neither used in DeepSSM.py nor bound to a parameter: {unused}"


def test_parameter_bindings_match_the_parameter_node():
    fields = parameter_fields()
    bound = {param for _, param in ui_widgets().values() if param}
    assert bound - fields == set(), (
        f"SlicerParameterName without a parameter-node field: {sorted(bound - fields)}"
    )
    assert fields - bound == set(), f"parameter-node fields without a widget: {sorted(fields - bound)}"


def test_module_keeps_the_template_structure_and_installs_nothing_at_import():
    tree = _tree()
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name, base in [
        ("DeepSSM", "ScriptedLoadableModule"),
        ("DeepSSMWidget", "ScriptedLoadableModuleWidget"),
        ("DeepSSMModuleLogic", "ScriptedLoadableModuleLogic"),
        ("DeepSSMTest", "ScriptedLoadableModuleTest"),
    ]:
        assert name in classes, f"DeepSSM.py lacks class {name}"
        assert base in {b.id for b in classes[name].bases if isinstance(b, ast.Name)}
    source = MODULE.read_text(encoding="utf-8")
    assert "tryWithErrorDisplay" in source and "connectGui(self.ui)" in source
    # no package installs or torch imports at module level or in setup()
    top_level_calls = [
        ast.unparse(n) for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
    ]
    assert not any("pip" in c or "install" in c for c in top_level_calls)
    assert not any(
        isinstance(n, ast.Import | ast.ImportFrom) and "torch" in ast.unparse(n) for n in tree.body
    )
    setup = next(
        f for f in classes["DeepSSMWidget"].body if isinstance(f, ast.FunctionDef) and f.name == "setup"
    )
    assert not any(k in ast.unparse(setup) for k in ("pip_", "ensure_", "installTorch", "import torch"))


def test_widgets_referenced_in_ui_connections_exist():
    root = ET.parse(UI).getroot()
    names = set(ui_widgets())
    for c in root.iter("connection"):
        assert c.findtext("sender") in names and c.findtext("receiver") in names


def _field_annotations() -> dict[str, str]:
    for node in ast.walk(_tree()):
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    return {}


def test_each_binding_has_a_type_slicers_gui_connectors_accept():
    """Mirror of slicer.parameterNodeWrapper.guiConnectors: e.g. ctkPathLineEdit binds only
    pathlib.Path, a QComboBox needs a Choice annotation, a ctkSliderWidget a bounded float."""
    rules = {
        "ctkPathLineEdit": lambda a: a == "Path",
        "QComboBox": lambda a: a.startswith("Annotated[str, Choice("),
        "QCheckBox": lambda a: a == "bool",
        "QSpinBox": lambda a: a.startswith("Annotated[int, WithinRange("),
        "ctkSliderWidget": lambda a: a.startswith("Annotated[float, WithinRange("),
        "qMRMLNodeComboBox": lambda a: a.startswith("vtkMRML"),
    }
    annotations = _field_annotations()
    bad = []
    for name, (cls, param) in ui_widgets().items():
        if param is None:
            continue
        rule = rules.get(cls)
        if rule is None or not rule(annotations.get(param, "")):
            bad.append(f"{name} ({cls}) -> {param}: {annotations.get(param)}")
    assert not bad, "bindings Slicer cannot connect: " + "; ".join(bad)


def test_module_does_not_use_postponed_annotations():
    # parameterNodeWrapper reads the class annotations at decoration time; string annotations from
    # `from __future__ import annotations` would hide Annotated[...] validators from it.
    assert "from __future__ import annotations" not in MODULE.read_text(encoding="utf-8")
