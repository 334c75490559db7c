"""DeepSSM: statistical shape models straight from images, in 3D Slicer.

Thin module in the Slicer 5.12 template style: metadata + sample data, a typed parameter node bound
to ``Resources/UI/DeepSSM.ui`` through ``SlicerParameterName``, a widget that wires buttons to a
façade logic, and the self-test. All MRML conversion is in ``DeepSSMLib.mrml`` (Qt-free, tested
headless); long work runs in a background process (``DeepSSMLib.runner`` + ``DeepSSMLib.worker``);
the science is in the ``DeepSSMLogic`` package.

Nothing is installed at import or in ``setup()``: torch comes from the PyTorch extension and the
other requirements through ``slicer.packaging.pip_ensure``, both when the user first needs them.
"""

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk

# DeepSSMLib puts DeepSSMLogic on sys.path (source tree and packaged layouts).
from DeepSSMLib import install, mrml
from DeepSSMLib.bundles import read_manifest
from DeepSSMLib.controller import DeepSSMController, resolve_bundle_path
from DeepSSMLib.runner import BackgroundRunner, RunOutcome, RunState
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DeepSSMLogic.commands._cohort_args import (
    DEFAULT_FRAME,
    DEFAULT_PARTICLES,
    FRAME_CHOICES,
    PARTICLE_CHOICES,
)

DEVICES = ["auto", "cpu", "cuda"]
WARNING_STYLE = "color: #b35900; font-weight: bold;"  # an out-of-distribution verdict


def _path(value) -> str:
    """A parameter-node path as a string, "" when unset (an empty Path reads back as ".")."""
    text = str(value) if value is not None else ""
    return "" if text in ("", ".") else text


#
# DeepSSM
#
class DeepSSM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepSSM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Shape Analysis")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepSSM for 3D Slicer developers"]
        self.parent.helpText = _(
            "Predict dense correspondence particles (a statistical shape model) directly from an image, "
            "train DeepSSM models on a cohort, and analyse shape differences. "
            "Particles and meshes are shown in RAS over the input volume, under its parent transform."
        )
        self.parent.acknowledgementText = _(
            "Implements DeepSSM (Bhalodia et al., 'DeepSSM: A Blueprint for Image-to-Shape Deep Learning "
            "Models', Medical Image Analysis 2024)."
        )
        # The base class looks only in <module dir>/Resources/Icons; from the source tree (the
        # README's install) Resources/ sits one level up, so point at wherever it is.
        icon = install.module_icon_path()
        if icon is not None:
            self.parent.icon = qt.QIcon(str(icon))
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the demo image as Slicer sample data (local files, SHA256-checked)."""
    import SampleData

    try:
        manifest_path = install.resource_path("SampleData/manifest.json")
        doc = read_manifest(manifest_path)
    except Exception:  # no (valid) demo shipped: nothing to register, never break startup
        return
    icon = str(install.resource_path("Icons/DeepSSM.png"))
    for name, info in doc["files"].items():
        if info.get("role") != "image":
            continue
        path = manifest_path.parent / name
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="DeepSSM",
            sampleName="DeepSSMDemoImage",
            thumbnailFileName=icon,
            uris=qt.QUrl.fromLocalFile(str(path)).toString(),
            fileNames=name,
            checksums=f"SHA256:{info['sha256']}",
            nodeNames="DeepSSMDemoImage",
        )


#
# Parameter node
#
@parameterNodeWrapper
class DeepSSMParameterNode:
    # inference
    inputVolume: vtkMRMLScalarVolumeNode
    bundlePath: Path
    device: Annotated[str, Choice(DEVICES)] = "auto"
    alreadyAligned: bool = False
    groundTruth: vtkMRMLMarkupsFiducialNode
    colourBy: Annotated[str, Choice(list(mrml.HEATMAP_CHOICES))] = "auto"
    # training
    cohortPath: Path
    outputBundlePath: Path
    augmentCount: Annotated[int, WithinRange(0, 100000)] = 0
    sampler: Annotated[str, Choice(["kde", "gaussian", "gmm"])] = "kde"
    onlineAugmentation: bool = False
    variant: Annotated[str, Choice(["base", "tl"])] = "base"
    loss: Annotated[str, Choice(["l2", "focal"])] = "l2"
    # the CLI's defaults for the default encoder (light2): `--epochs auto` = 30, batch 8 (BENCHMARKS.md)
    epochs: Annotated[int, WithinRange(1, 100000)] = 30
    batchSize: Annotated[int, WithinRange(1, 4096)] = 8
    trainDevice: Annotated[str, Choice(DEVICES)] = "auto"
    # training: the shared cohort options of `deepssm train` (ShapeWorks projects); the combo boxes
    # are filled from these Choice annotations (Slicer's QComboBox connector), i.e. from the CLI
    cohortDomain: str = ""  # "" = the first domain
    cohortParticles: Annotated[str, Choice(list(PARTICLE_CHOICES))] = DEFAULT_PARTICLES
    cohortFrame: Annotated[str, Choice(list(FRAME_CHOICES))] = DEFAULT_FRAME
    cohortImageColumn: str = ""  # "" = ShapeWorks' default image column
    cohortAllowImageOnly: bool = False
    # analysis
    groupAPath: Path
    groupBPath: Path
    swimValue: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    normalGroupPath: Path
    subjectsPath: Path


#
# Widget
#
class DeepSSMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        # progress widgets of the running task; None until a task is being started
        self._bar = None
        self._label = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(install.resource_path("UI/DeepSSM.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepSSMModuleLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onTimer)
        self.logic.runner.on_progress.append(self.onProgress)
        self.logic.runner.on_log.append(self.onLog)
        self.logic.runner.on_finished.append(self.onFinished)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadDemoButton.connect("clicked(bool)", self.onLoadDemo)
        self.ui.recentBundlesComboBox.connect("activated(int)", self.onRecentBundle)
        self.ui.colourByComboBox.connect("currentTextChanged(QString)", self.onColourBy)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.stopButton.connect("clicked(bool)", self.onStopButton)
        self.ui.groupDifferenceButton.connect("clicked(bool)", self.onGroupDifference)
        self.ui.swimSlider.connect("valueChanged(double)", self.onSwim)
        self.ui.severityButton.connect("clicked(bool)", self.onSeverity)
        self.ui.bundleFolderButton.connect("clicked(bool)", self.onBundleFolder)
        self.ui.showShapeModelButton.connect("clicked(bool)", self.onShowShapeModel)
        self._modeSliders = [self.ui.mode1Slider, self.ui.mode2Slider, self.ui.mode3Slider]
        for slider in self._modeSliders:
            slider.connect("valueChanged(double)", self.onModeSlider)
        self.ui.stopButton.enabled = False
        self.ui.logTextEdit.setMaximumBlockCount(5000)
        self.refreshRecentBundles()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic is not None and self.logic.runner.running:
            self.logic.runner.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()
        # torch is imported (never installed) only once the module is shown, off the startup path
        qt.QTimer.singleShot(0, self.updateGpuLabel)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _blankEmptyPaths(self) -> None:
        """An unset Path parameter reads back as "." and the connector shows it; show "" instead."""
        for widget in (
            self.ui.bundlePathLineEdit,
            self.ui.cohortPathLineEdit,
            self.ui.outputBundlePathLineEdit,
            self.ui.groupAPathLineEdit,
            self.ui.groupBPathLineEdit,
            self.ui.normalGroupPathLineEdit,
            self.ui.subjectsPathLineEdit,
        ):
            if widget.currentPath == ".":
                wasBlocked = widget.blockSignals(True)
                widget.currentPath = ""
                widget.blockSignals(wasBlocked)

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        self._blankEmptyPaths()
        running = self.logic.runner.running
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.enabled = self.logic.task == "predict"
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.enabled = bool(p and p.inputVolume and _path(p.bundlePath))
        self.ui.trainButton.enabled = (
            bool(p and _path(p.cohortPath) and _path(p.outputBundlePath)) and not running
        )
        self.ui.stopButton.enabled = running and self.logic.task == "train"
        self.ui.showShapeModelButton.enabled = bool(p and _path(p.bundlePath))

    def updateGpuLabel(self) -> None:
        names = install.gpu_names()
        self.ui.gpuNameLabel.text = ", ".join(names) if names else _("none detected (CPU will be used)")

    def refreshRecentBundles(self) -> None:
        self.ui.recentBundlesComboBox.clear()
        for path in self.logic.recentBundles.items():
            self.ui.recentBundlesComboBox.addItem(Path(path).name, path)

    def onBundleFolder(self) -> None:
        """Pick a bundle folder (the path field's file dialog cannot select folders)."""
        start = _path(self._parameterNode.bundlePath) if self._parameterNode else ""
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Select a DeepSSM model bundle folder"), start
        )
        if folder and self._parameterNode:
            self._parameterNode.bundlePath = Path(folder)

    def onRecentBundle(self, index: int) -> None:
        path = self.ui.recentBundlesComboBox.itemData(index)
        if path and self._parameterNode:
            self._parameterNode.bundlePath = Path(path)

    # -- inference ------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self.logic.runner.running:
            self.logic.runner.cancel()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the DeepSSM prediction."), waitCursor=True):
            # set before starting: a process that fails to start reports to onFinished at once
            self._bar, self._label = self.ui.inferenceProgressBar, self.ui.inferenceStatusLabel
            self.showVerdict(None)
            self.logic.colourBy = p.colourBy
            self.logic.startPrediction(
                p.inputVolume, _path(p.bundlePath), p.device, p.alreadyAligned, groundTruth=p.groundTruth
            )
            self._started()

    def onColourBy(self, choice: str) -> None:
        """Recolour the last prediction (surface and particles) by the chosen heatmap."""
        if choice not in mrml.HEATMAP_CHOICES:  # "" while the connector refills the combo box
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to change the heatmap."), waitCursor=True):
            shown = self.logic.setColourBy(choice)
            if choice == "uncertainty" and shown != "uncertainty_mm" and self.logic.lastPrediction:
                self.ui.inferenceStatusLabel.text = _(
                    "No uncertainty: the model bundle does not predict one."
                )

    def showVerdict(self, verdict) -> None:
        """The OOD verdict and uncertainty summary under the status line; a warning style when the
        image was flagged out of distribution."""
        label = self.ui.predictionVerdictLabel
        label.text = verdict.text if verdict is not None else ""
        label.setStyleSheet(WARNING_STYLE if verdict is not None and verdict.warning else "")

    def onLoadDemo(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the demo data."), waitCursor=True):
            volume, groundTruth, bundle = self.logic.loadDemo()
            self._parameterNode.inputVolume = volume
            self._parameterNode.groundTruth = groundTruth
            self._parameterNode.bundlePath = Path(bundle)
            # the demo image comes from the bundle's own synthetic cohort: already in the model frame
            self._parameterNode.alreadyAligned = True
            slicer.util.setSliceViewerLayers(background=volume, fit=True)

    # -- training -------------------------------------------------------------------------------
    def onTrainButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=True):
            self.ui.logTextEdit.clear()
            self._bar, self._label = self.ui.trainingProgressBar, self.ui.trainingStatusLabel
            chart = self.logic.startTraining(
                _path(p.cohortPath),
                _path(p.outputBundlePath),
                p.variant,
                p.loss,
                p.epochs,
                p.batchSize,
                p.trainDevice,
                p.augmentCount,
                p.sampler,
                p.onlineAugmentation,
                domain=p.cohortDomain,
                particles=p.cohortParticles,
                frame=p.cohortFrame,
                imageColumn=p.cohortImageColumn,
                allowImageOnly=p.cohortAllowImageOnly,
            )
            slicer.modules.plots.logic().ShowChartInLayout(chart)
            self._started()

    def onStopButton(self) -> None:
        self.logic.runner.cancel()

    # -- background progress --------------------------------------------------------------------
    def _started(self) -> None:
        self._bar.value = 0
        self._bar.visible = True
        self._label.text = _("Starting…")
        self._timer.start()
        self._checkCanApply()

    def onTimer(self) -> None:
        if not self.logic.runner.poll():
            self._timer.stop()
            return
        elapsed = self.logic.runner.elapsed_s
        eta = self.logic.runner.eta_s()
        ev = self.logic.runner.last_event
        text = f"{ev.stage}: {ev.message}  " if ev else ""
        text += _("elapsed {0:.0f} s").format(elapsed)
        if eta is not None:
            text += _(", about {0:.0f} s left").format(eta)
        if self._label is not None:
            self._label.text = text

    def onProgress(self, event) -> None:
        if self._bar is not None:
            self._bar.maximum = max(event.total, 1)
            self._bar.value = event.done
        self.logic.onProgressMetrics(event)

    def onLog(self, line: str) -> None:
        if self.logic.task == "train":
            self.ui.logTextEdit.appendPlainText(line)

    def onFinished(self, outcome: RunOutcome) -> None:
        self._timer.stop()
        if self._bar is not None:
            self._bar.visible = False
        label = self._label if self._label is not None else self.ui.inferenceStatusLabel
        try:
            if outcome.state is RunState.SUCCEEDED:
                with slicer.util.tryWithErrorDisplay(
                    _("Failed to show the DeepSSM results."), waitCursor=True
                ):
                    self.logic.finish(outcome)
                    label.text = _("Done in {0:.1f} s").format(outcome.elapsed_s)
                    if (outcome.result or {}).get("kind") == "prediction":
                        self.showVerdict(self.logic.lastVerdict)
                    if self.logic.lastTrainedBundle:
                        self._parameterNode.bundlePath = Path(self.logic.lastTrainedBundle)
                    self.refreshRecentBundles()
            elif outcome.state is RunState.CANCELLED:
                label.text = _("Cancelled after {0:.0f} s").format(outcome.elapsed_s)
            else:
                label.text = _("Failed: {0}").format(outcome.error)
                if outcome.returncode is not None:  # a start failure is shown by tryWithErrorDisplay
                    slicer.util.errorDisplay(outcome.error, detailedText=outcome.details)
        finally:
            self.logic.cleanupTask()
            self._checkCanApply()

    # -- analysis -------------------------------------------------------------------------------
    def onGroupDifference(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the group difference."), waitCursor=True):
            self.ui.analysisStatusLabel.text = self.logic.showGroupDifference(
                _path(p.groupAPath), _path(p.groupBPath)
            )

    def onSwim(self, value: float) -> None:
        self.logic.swimTo(value)

    def onSeverity(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to compute severity."), waitCursor=True):
            _table, self.ui.analysisStatusLabel.text = self.logic.showSeverity(
                _path(p.normalGroupPath), _path(p.subjectsPath)
            )

    # -- shape-model explorer -------------------------------------------------------------------
    def onShowShapeModel(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to show the shape model."), waitCursor=True):
            explorer = self.logic.showShapeModel(resolve_bundle_path(_path(p.bundlePath)))
            for i, slider in enumerate(self._modeSliders):
                slider.enabled = i < explorer.n_modes
                wasBlocked = slider.blockSignals(True)
                slider.value = 0.0
                slider.blockSignals(wasBlocked)
            self.ui.explorerStatusLabel.text = self.logic.explorerSummary()

    def onModeSlider(self, _value: float = 0.0) -> None:
        self.logic.warpShapeModel([slider.value for slider in self._modeSliders])


#
# Logic (named DeepSSMModuleLogic so that it does not shadow the DeepSSMLogic package)
#
class DeepSSMModuleLogic(DeepSSMController, ScriptedLoadableModuleLogic):
    """Façade over DeepSSMLogic for the widget; usable without it (see DeepSSMTest).

    Everything Qt-free lives in ``DeepSSMLib.controller.DeepSSMController`` (tested headless); this
    class adds what needs the application: settings path, PythonSlicer, dialogs, event loop, layout.
    """

    def __init__(self, runner: BackgroundRunner | None = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # the class name would make the parameter node's singleton tag "DeepSSMModule"
        self.moduleName = "DeepSSM"
        DeepSSMController.__init__(
            self,
            scene=lambda: slicer.mrmlScene,
            runner=runner,
            recent_store=Path(slicer.app.slicerUserSettingsFilePath).parent / "DeepSSM-recent-bundles.json",
        )

    def getParameterNode(self):
        return DeepSSMParameterNode(super().getParameterNode())

    def python(self) -> str:
        """The interpreter for the worker: PythonSlicer inside Slicer (same packages, no GUI)."""
        return shutil.which("PythonSlicer") or sys.executable

    def ensureRequirements(self) -> None:
        """torch from the PyTorch extension, the rest via pip_ensure — at first use only."""
        install.ensure_torch(ask_confirmation=True)
        install.ensure_requirements(requester="DeepSSM", confirm=slicer.util.confirmOkCancelDisplay)

    def processEvents(self) -> None:
        slicer.app.processEvents()

    def showSeverity(self, normalGroup: str, subjects: str):
        """Severity table, shown in a layout that has a table view."""
        table, summary = DeepSSMController.showSeverity(self, normalGroup, subjects)
        mrml.show_table_in_layout(slicer.app.applicationLogic(), table)
        return table, summary

    def showShapeModel(self, bundlePath: str):
        """The explorer, with its variance plot shown in the layout."""
        explorer = DeepSSMController.showShapeModel(self, bundlePath)
        slicer.modules.plots.logic().ShowChartInLayout(self.explorerNodes.variance_chart)
        return explorer


#
# Self-test (Slicer's headless runner: Slicer --no-main-window --testing)
#
def _load_self_test():
    path = Path(__file__).resolve().parent / "Testing" / "DeepSSMSelfTest.py"
    spec = importlib.util.spec_from_file_location("DeepSSMSelfTest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class DeepSSMTest(ScriptedLoadableModuleTest):
    """Loads the demo data, predicts with the demo bundle, checks nodes and coordinates."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        _load_self_test().run_all(self, DeepSSMModuleLogic)
