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
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk

# DeepSSMLib puts DeepSSMLogic on sys.path (source tree and packaged layouts).
from DeepSSMLib import analysis as dsa
from DeepSSMLib import install, mrml
from DeepSSMLib.bundles import RecentBundles, read_manifest, verified_sample_file
from DeepSSMLib.runner import BackgroundRunner, RunOutcome, RunState, worker_command, worker_environment
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

DEVICES = ["auto", "cpu", "cuda"]


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
    # training
    cohortPath: Path
    outputBundlePath: Path
    augmentCount: Annotated[int, WithinRange(0, 100000)] = 0
    sampler: Annotated[str, Choice(["kde", "gaussian", "gmm"])] = "kde"
    onlineAugmentation: bool = False
    variant: Annotated[str, Choice(["base", "tl"])] = "base"
    loss: Annotated[str, Choice(["l2", "focal"])] = "l2"
    epochs: Annotated[int, WithinRange(1, 100000)] = 50
    batchSize: Annotated[int, WithinRange(1, 4096)] = 4
    trainDevice: Annotated[str, Choice(DEVICES)] = "auto"
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
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.stopButton.connect("clicked(bool)", self.onStopButton)
        self.ui.groupDifferenceButton.connect("clicked(bool)", self.onGroupDifference)
        self.ui.swimSlider.connect("valueChanged(double)", self.onSwim)
        self.ui.severityButton.connect("clicked(bool)", self.onSeverity)
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

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
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

    def updateGpuLabel(self) -> None:
        names = install.gpu_names()
        self.ui.gpuNameLabel.text = ", ".join(names) if names else _("none detected (CPU will be used)")

    def refreshRecentBundles(self) -> None:
        self.ui.recentBundlesComboBox.clear()
        for path in self.logic.recentBundles.items():
            self.ui.recentBundlesComboBox.addItem(Path(path).name, path)

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
            self.logic.startPrediction(
                p.inputVolume, _path(p.bundlePath), p.device, p.alreadyAligned, groundTruth=p.groundTruth
            )
            self._started(self.ui.inferenceProgressBar, self.ui.inferenceStatusLabel)

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
            )
            slicer.modules.plots.logic().ShowChartInLayout(chart)
            self._started(self.ui.trainingProgressBar, self.ui.trainingStatusLabel)

    def onStopButton(self) -> None:
        self.logic.runner.cancel()

    # -- background progress --------------------------------------------------------------------
    def _started(self, bar, label) -> None:
        self._bar, self._label = bar, label
        bar.value = 0
        bar.visible = True
        label.text = _("Starting…")
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
        self._label.text = text

    def onProgress(self, event) -> None:
        self._bar.maximum = max(event.total, 1)
        self._bar.value = event.done
        self.logic.onProgressMetrics(event)

    def onLog(self, line: str) -> None:
        if self.logic.task == "train":
            self.ui.logTextEdit.appendPlainText(line)

    def onFinished(self, outcome: RunOutcome) -> None:
        self._bar.visible = False
        self._timer.stop()
        try:
            if outcome.state is RunState.SUCCEEDED:
                with slicer.util.tryWithErrorDisplay(
                    _("Failed to show the DeepSSM results."), waitCursor=True
                ):
                    self.logic.finish(outcome)
                    self._label.text = _("Done in {0:.1f} s").format(outcome.elapsed_s)
                    if self.logic.lastTrainedBundle:
                        self._parameterNode.bundlePath = Path(self.logic.lastTrainedBundle)
                    self.refreshRecentBundles()
            elif outcome.state is RunState.CANCELLED:
                self._label.text = _("Cancelled after {0:.0f} s").format(outcome.elapsed_s)
            else:
                self._label.text = _("Failed: {0}").format(outcome.error)
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
            self.ui.analysisStatusLabel.text = self.logic.showSeverity(
                _path(p.normalGroupPath), _path(p.subjectsPath)
            )


#
# Logic (named DeepSSMModuleLogic so that it does not shadow the DeepSSMLogic package)
#
class DeepSSMModuleLogic(ScriptedLoadableModuleLogic):
    """Façade over DeepSSMLogic for the widget; usable without it (see DeepSSMTest)."""

    def __init__(self, runner: BackgroundRunner | None = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner = runner or BackgroundRunner()
        self.recentBundles = RecentBundles(
            Path(slicer.app.slicerUserSettingsFilePath).parent / "DeepSSM-recent-bundles.json"
        )
        self.task = None
        self.workDir = None
        self.predictionNodes = {}
        self.trainingChart = None
        self.lastTrainedBundle = None
        self.swimPath = None
        self.swimNode = None
        self._volume = None
        self._bundle = None

    def getParameterNode(self):
        return DeepSSMParameterNode(super().getParameterNode())

    @staticmethod
    def python() -> str:
        """The interpreter for the worker: PythonSlicer inside Slicer (same packages, no GUI)."""
        return shutil.which("PythonSlicer") or sys.executable

    def ensureRequirements(self) -> None:
        """torch from the PyTorch extension, the rest via pip_ensure — at first use only."""
        install.ensure_torch(ask_confirmation=True)
        install.ensure_requirements(requester="DeepSSM", confirm=slicer.util.confirmOkCancelDisplay)

    def _newWorkDir(self) -> str:
        self.workDir = tempfile.mkdtemp(prefix="DeepSSM-")
        return self.workDir

    def startPrediction(
        self,
        volume,
        bundlePath: str,
        device: str = "auto",
        aligned: bool = False,
        groundTruth=None,
        normalParticles=None,
    ) -> None:
        """Export the volume (LPS NRRD) and launch the worker; results arrive in :meth:`finish`."""
        if volume is None:
            raise ValueError(_("Select an input volume."))
        if not bundlePath or not os.path.exists(bundlePath):
            raise ValueError(_("Select an existing model bundle (folder or .zip): {0}").format(bundlePath))
        self.ensureRequirements()
        from DeepSSMLogic import io

        work = self._newWorkDir()
        image = os.path.join(work, "input.nrrd")
        io.write_image(mrml.volume_to_sitk(volume), image)
        args = [
            "--bundle",
            bundlePath,
            "--image",
            image,
            "--out",
            os.path.join(work, "out"),
            "--device",
            device,
        ]
        if aligned:
            args.append("--aligned")
        if groundTruth is not None and groundTruth.GetNumberOfControlPoints():
            # local frame: the ground truth is expected next to the volume, like the outputs
            gt = os.path.join(work, "ground_truth.csv")
            io.write_particles(gt, mrml.markups_to_particles(groundTruth))
            args += ["--ground-truth", gt]
        if normalParticles:
            args += ["--normal-particles", *[str(p) for p in normalParticles]]
        self.task = "predict"
        self.lastTrainedBundle = None
        self._volume, self._bundle = volume, bundlePath
        self.runner.start(worker_command(self.python(), "predict", args), env=worker_environment(device))

    def startTraining(
        self, cohort, outputBundle, variant, loss, epochs, batchSize, device, augmentCount, sampler, online
    ):
        """Launch training in the background; returns the live loss chart node."""
        if not cohort or not os.path.exists(cohort):
            raise ValueError(_("Select an existing cohort file: {0}").format(cohort))
        if not outputBundle:
            raise ValueError(_("Choose where to write the trained bundle."))
        self.ensureRequirements()
        args = [
            "--cohort",
            cohort,
            "--out",
            outputBundle,
            "--variant",
            variant,
            "--loss",
            loss,
            "--epochs",
            str(epochs),
            "--batch-size",
            str(batchSize),
            "--device",
            device,
            "--augment-count",
            str(augmentCount),
            "--sampler",
            sampler,
        ]
        if online:
            args.append("--online")
        scene = slicer.mrmlScene
        curves = mrml.plot_chart(
            scene,
            "DeepSSM training",
            "epoch",
            ["train_loss", "val_loss", "val_rmse_mm"],
            title=_("DeepSSM training"),
            y_label=_("loss / RMSE (mm)"),
        )
        self.trainingChart = curves
        self.task = "train"
        self.lastTrainedBundle = None
        self.runner.start(worker_command(self.python(), "train", args), env=worker_environment(device))
        return curves.chart

    def onProgressMetrics(self, event) -> None:
        """Live curves: one table row per epoch event."""
        if self.task == "train" and self.trainingChart is not None and "epoch" in event.metrics:
            row = {k: v for k, v in event.metrics.items() if isinstance(v, (int, float))}
            row["epoch"] = float(event.done)
            mrml.append_table_row(self.trainingChart.table, row)

    def finish(self, outcome: RunOutcome):
        """Turn a successful run's result into nodes (prediction) or a registered bundle (training)."""
        result = outcome.result or {}
        if result.get("kind") == "prediction":
            key = self._volume.GetID()
            nodes = mrml.show_prediction(
                slicer.mrmlScene, self._volume, result, self.predictionNodes.get(key)
            )
            self.predictionNodes[key] = nodes
            self.recentBundles.add(self._bundle)
            return nodes
        if result.get("kind") == "training":
            self.lastTrainedBundle = result["bundle"]
            self.recentBundles.add(result["bundle"])
            return result["bundle"]
        raise RuntimeError(f"unexpected result from the DeepSSM worker: {sorted(result)}")

    def cleanupTask(self) -> None:
        if self.workDir:
            shutil.rmtree(self.workDir, ignore_errors=True)
        self.workDir = None
        self.task = None

    def predictBlocking(
        self, volume, bundlePath, device="cpu", aligned=False, groundTruth=None, timeout_s=600.0
    ):
        """Run a prediction to completion (scripts and the self-test); returns the output nodes."""
        self.startPrediction(volume, bundlePath, device, aligned, groundTruth)
        deadline = time.monotonic() + timeout_s
        try:
            while self.runner.poll():
                if time.monotonic() > deadline:
                    self.runner.cancel()
                    raise TimeoutError(f"DeepSSM prediction took longer than {timeout_s} s")
                slicer.app.processEvents()
                time.sleep(0.05)
            outcome = self.runner.outcome
            if outcome.state is not RunState.SUCCEEDED:
                raise RuntimeError(f"{outcome.error}\n{outcome.details}")
            return self.finish(outcome)
        finally:
            self.cleanupTask()

    def loadDemo(self):
        """Load the demo image and ground truth; returns (volume, ground-truth point list, bundle path)."""
        from DeepSSMLogic import io

        image = verified_sample_file("image")
        truth = verified_sample_file("ground_truth")
        bundle = verified_sample_file("bundle")
        volume = mrml.add_volume_from_sitk(slicer.mrmlScene, io.read_image(image), "DeepSSM demo image")
        gt = mrml.particles_to_markups(
            slicer.mrmlScene,
            io.read_particles(truth),
            "DeepSSM demo ground truth",
            reference=volume,
            color=(0.2, 0.8, 0.2),
        )
        return volume, gt, str(bundle)

    # -- analysis -------------------------------------------------------------------------------
    def showGroupDifference(self, groupA: str, groupB: str) -> str:
        """Mean of A coloured by the distance to mean of B (mm); prepares the swim path A → B."""
        _namesA, a = dsa.load_group(groupA)
        _namesB, b = dsa.load_group(groupB)
        from DeepSSMLogic.analysis.groups import group_difference

        diff = group_difference(a, b)
        scene = slicer.mrmlScene
        node = mrml.add_point_cloud_model(
            scene,
            diff.mean_a,
            "DeepSSM group difference",
            particle_values={"difference_mm": diff.magnitude},
            node=scene.GetFirstNodeByName("DeepSSM group difference"),
        )
        mrml.show_scalar_heatmap(node, "difference_mm", "viridis", title=_("|B − A| (mm)"))
        self.swimPath = dsa.swim_between_groups(a, b)
        self.swimTo(0.0)
        return _("{0} vs {1} shapes; largest mean difference {2:.2f} mm").format(
            len(a), len(b), float(diff.magnitude.max())
        )

    def swimTo(self, value: float) -> None:
        """Morph the swim shape live to ``value`` in [0, 1] (A → B)."""
        if self.swimPath is None:
            return
        pts = self.swimPath.at(value)
        if self.swimNode is None or self.swimNode.GetScene() is None:
            self.swimNode = mrml.particles_to_markups(slicer.mrmlScene, pts, "DeepSSM swim")
        else:
            mrml.update_markups_from_particles(self.swimNode, pts)

    def showSeverity(self, normalGroup: str, subjects: str) -> str:
        _names, normal = dsa.load_group(normalGroup)
        names, subj = dsa.load_group(subjects)
        scores = dsa.severity_scores(normal, subj)
        table = slicer.mrmlScene.GetFirstNodeByName("DeepSSM severity") or slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLTableNode", "DeepSSM severity"
        )
        mrml.update_table(table, {"subject": names, "severity (Mahalanobis)": [float(s) for s in scores]})
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        return _("Severity of {0} subjects against {1} normal shapes").format(len(names), len(normal))


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
