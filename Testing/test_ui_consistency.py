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
        "QLineEdit": lambda a: a == "str",
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


def _widget(name: str) -> ET.Element:
    for w in ET.parse(UI).getroot().iter("widget"):
        if w.get("name") == name:
            return w
    raise AssertionError(f"DeepSSM.ui has no widget {name}")


def _prop(widget: ET.Element, name: str) -> ET.Element | None:
    return next((p for p in widget.findall("property") if p.get("name") == name), None)


def test_input_volume_selector_offers_no_label_maps():
    # vtkMRMLLabelMapVolumeNode derives from vtkMRMLScalarVolumeNode: hide child types (as the template)
    prop = _prop(_widget("inputVolumeSelector"), "showChildNodeTypes")
    assert prop is not None and prop.findtext("bool") == "false"


def test_bundle_can_be_picked_as_a_folder_or_its_model_json():
    edit = _widget("bundlePathLineEdit")
    # ctkPathLineEdit with Files|Dirs opens a file dialog that cannot select a folder
    assert "Dirs" not in (_prop(edit, "filters").findtext("set") or "")
    assert "model.json" in " ".join(s.text or "" for s in _prop(edit, "nameFilters").iter("string"))
    assert _widget("bundleFolderButton").get("class") == "QPushButton"
    assert "bundleFolderButton" in code_ui_names() and "getExistingDirectory" in MODULE.read_text()


def test_parameter_node_singleton_tag_is_the_module_name():
    # ScriptedLoadableModuleLogic derives the tag from the class name: "DeepSSMModule" otherwise
    logic = next(n for n in _tree().body if isinstance(n, ast.ClassDef) and n.name == "DeepSSMModuleLogic")
    init = next(f for f in logic.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    src = ast.unparse(init)
    assert "self.moduleName = 'DeepSSM'" in src
    assert src.index("ScriptedLoadableModuleLogic.__init__") < src.index("self.moduleName = 'DeepSSM'")


def test_module_icon_is_set_from_wherever_resources_are():
    module = next(n for n in _tree().body if isinstance(n, ast.ClassDef) and n.name == "DeepSSM")
    src = ast.unparse(module)
    assert "module_icon_path()" in src and "self.parent.icon = qt.QIcon" in src


def test_empty_path_fields_are_shown_blank_not_dot():
    src = MODULE.read_text(encoding="utf-8")
    assert "def _blankEmptyPaths" in src and "self._blankEmptyPaths()" in src
    path_edits = [n for n, (cls, p) in ui_widgets().items() if cls == "ctkPathLineEdit" and p]
    blank = src[src.index("def _blankEmptyPaths") : src.index("def _checkCanApply")]
    assert all(f"self.ui.{n}" in blank for n in path_edits), "every bound path field is blanked"


def test_no_deprecated_markups_calls():
    lib = REPO / "DeepSSMExtension"
    for py in lib.rglob("*.py"):
        assert "SetMarkupLabelFormat" not in py.read_text(encoding="utf-8"), (
            f"{py}: use SetControlPointLabelFormat"
        )


def test_explorer_sliders_span_three_standard_deviations():
    for k in (1, 2, 3):
        w = _widget(f"mode{k}Slider")
        assert _prop(w, "minimum").findtext("double") == "-3"
        assert _prop(w, "maximum").findtext("double") == "3"


def test_training_panel_offers_the_shared_cohort_options_with_the_cli_choices():
    """Issue 10: the panel's cohort options are the CLI's (``commands/_cohort_args.py``): every option
    has a bound widget, and the combo choices come from the CLI's constants (Slicer's QComboBox
    connector fills the box from the Choice annotation), none typed in the .ui."""
    bound = {param: name for name, (_, param) in ui_widgets().items() if param}
    annotations = _field_annotations()
    for param, annotation in (
        ("cohortDomain", "str"),
        ("cohortParticles", "Annotated[str, Choice(list(PARTICLE_CHOICES))]"),
        ("cohortFrame", "Annotated[str, Choice(list(FRAME_CHOICES))]"),
        ("cohortImageColumn", "str"),
        ("cohortAllowImageOnly", "bool"),
    ):
        assert param in bound, f"no training-panel widget bound to {param}"
        assert annotations.get(param) == annotation, f"{param}: {annotations.get(param)}"
    root = ET.parse(UI).getroot()
    for param in ("cohortParticles", "cohortFrame"):
        widget = next(w for w in root.iter("widget") if w.get("name") == bound[param])
        assert widget.findall("item") == [], f"{bound[param]} repeats the CLI's choices in the .ui"
    source = MODULE.read_text(encoding="utf-8")
    assert "from DeepSSMLogic.commands._cohort_args import" in source
