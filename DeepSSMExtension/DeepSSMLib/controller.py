"""What the DeepSSM module does, without Qt: the body of ``DeepSSMModuleLogic``.

``DeepSSM.py``'s logic class derives from :class:`DeepSSMController` and only adds what needs the
application (settings path, PythonSlicer, confirmation dialogs, event processing, layouts), so
everything here runs on a headless ``slicer-core`` scene in the tests.

Bookkeeping rules that the module relies on:

- output nodes are remembered per input volume only for the scene they live in
  (:class:`PredictionRegistry`): the map is cleared when the scene starts closing, and a node the
  user deleted is recreated instead of written to;
- a background task owns a temporary work directory; whatever way the task ends (success,
  failure, cancel, a process that never started) :meth:`DeepSSMController.cleanupTask` removes it
  and clears ``task``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core (headless tests) has no slicer.i18n

    def _(text: str) -> str:
        return text


from DeepSSMLogic.commands._cohort_args import DEFAULT_FRAME, DEFAULT_PARTICLES, cohort_option_argv
from DeepSSMLogic.errors import InputError

from . import analysis as dsa
from . import mrml
from .bundles import RecentBundles, verified_sample_file
from .runner import BackgroundRunner, RunOutcome, RunState, worker_command, worker_environment

MODEL_JSON = "model.json"


def resolve_bundle_path(path: str | os.PathLike[str]) -> str:
    """The bundle (folder or .zip) a user picked: a folder's ``model.json`` stands for the folder
    (file dialogs cannot pick folders). "" stays ""; raises InputError for a missing path."""
    text = str(path or "")
    if text in ("", "."):
        return ""
    p = Path(text)
    if p.name == MODEL_JSON and p.is_file():
        return str(p.parent)
    if not p.exists():
        raise InputError(f"model bundle not found: {p} (pick a bundle folder, its model.json, or a .zip)")
    return str(p)


@dataclass
class Verdict:
    """What the status area says about a prediction's trustworthiness: ``uncertainty`` and ``ood``
    lines, and ``warning`` when the image was flagged out of distribution (shown in a warning
    style)."""

    uncertainty: str
    ood: str
    warning: bool

    @property
    def text(self) -> str:
        return f"{self.ood}\n{self.uncertainty}"


def _number(v: Any) -> str:
    return "–" if v is None else f"{float(v):.3g}"


def prediction_verdict(result: Mapping[str, Any]) -> Verdict:
    """The OOD verdict and uncertainty summary of a worker result (``"uncertainty"``/``"ood"`` as
    the worker writes them; results of bundles without them, or of older workers, say so)."""
    unc = result.get("uncertainty")
    if unc:
        method = f" ({unc['method']})" if unc.get("method") else ""
        unc_text = (_("Uncertainty{method}: mean {mean} mm, max {max} mm per particle")).format(
            method=method, mean=_number(unc.get("mean_mm")), max=_number(unc.get("max_mm"))
        )
    else:
        unc_text = _("No uncertainty: the model bundle does not predict one.")
    ood = result.get("ood")
    if not ood:
        return Verdict(unc_text, _("No out-of-distribution check: the model bundle has none."), False)
    score = _("score {score} / threshold {threshold}").format(
        score=_number(ood.get("score")), threshold=_number(ood.get("threshold"))
    )
    if ood.get("flag"):
        reasons = "; ".join(str(r) for r in ood.get("reasons") or []) or score
        verdict = _("Out of distribution: {reasons} ({score}). Do not trust this prediction.")
        return Verdict(unc_text, verdict.format(reasons=reasons, score=score), True)
    return Verdict(unc_text, _("Within the training distribution ({score}).").format(score=score), False)


class PredictionRegistry:
    """Output nodes of the last prediction per input volume, valid only in their own scene.

    Node IDs restart after Close Scene, so a volume ID alone would hand back nodes of the old
    scene; :meth:`get` returns only nodes still in the scene, and :meth:`watch` clears the map when
    the scene starts closing.
    """

    def __init__(self) -> None:
        self._nodes: dict[str, mrml.PredictionNodes] = {}
        self._watched: list[tuple[Any, int]] = []

    def get(self, scene: Any, volume: Any) -> mrml.PredictionNodes | None:
        nodes = self._nodes.get(volume.GetID())
        if nodes is None or mrml.in_scene(volume, scene) is None:
            return None
        return nodes.only_in(scene)

    def put(self, volume: Any, nodes: mrml.PredictionNodes) -> None:
        self._nodes[volume.GetID()] = nodes

    def clear(self) -> None:
        self._nodes.clear()

    def __len__(self) -> int:
        return len(self._nodes)

    def watch(self, scene: Any) -> None:
        """Clear the map on ``scene``'s StartCloseEvent (once per scene)."""
        if any(s is scene for s, _ in self._watched):
            return
        ref = weakref.ref(self)  # the scene must not keep the registry alive

        def on_start_close(*_: Any) -> None:
            registry = ref()
            if registry is not None and hasattr(registry, "_nodes"):  # not half torn down at exit
                registry.clear()

        tag = scene.AddObserver(scene.StartCloseEvent, on_start_close)
        self._watched.append((scene, tag))

    def unwatch(self) -> None:
        for scene, tag in self._watched:
            scene.RemoveObserver(tag)
        self._watched.clear()


class DeepSSMController:
    """Starts background tasks, turns their results into nodes and runs the analyses.

    ``scene`` is called whenever the scene is needed (Slicer's ``slicer.mrmlScene`` may be
    replaced); ``runner`` launches the worker; ``recent_store`` is the JSON file of recent bundles.
    Subclasses override :meth:`python`, :meth:`ensureRequirements` and :meth:`processEvents`.
    """

    def __init__(
        self,
        scene: Callable[[], Any],
        runner: BackgroundRunner | None = None,
        recent_store: str | os.PathLike[str] | None = None,
    ) -> None:
        self._scene = scene
        self.runner = runner or BackgroundRunner()
        store = recent_store or Path(tempfile.gettempdir()) / "DeepSSM-recent-bundles.json"
        self.recentBundles = RecentBundles(store)
        self.task: str | None = None
        self.workDir: str | None = None
        self.predictions = PredictionRegistry()
        self.trainingChart: mrml.Chart | None = None
        self.lastTrainedBundle: str | None = None
        self.swimPath: dsa.SwimPath | None = None
        self.swimNode: Any = None
        self.lastPrediction: dict[str, Any] | None = None
        self.lastVerdict: Verdict | None = None
        self.colourBy = "auto"  # the heatmap shown on a prediction (mrml.HEATMAP_CHOICES)
        self.shownHeatmap: str | None = None
        self._volume: Any = None
        self._bundle: str | None = None
        self.explorer: Any = None  # explorer.ShapeModelExplorer of the shown bundle
        self.explorerNodes: Any = None
        self.predictions.watch(scene())

    @property
    def scene(self) -> Any:
        return self._scene()

    # -- hooks (the Slicer module overrides them) ------------------------------------------------
    def python(self) -> str | None:
        """The interpreter for the worker (None: this Python)."""
        return None

    def ensureRequirements(self) -> None:
        """Install what the worker needs; nothing to do outside Slicer."""

    def processEvents(self) -> None:
        """Let the GUI breathe while :meth:`predictBlocking` waits."""

    # -- background tasks ------------------------------------------------------------------------
    def _newWorkDir(self) -> str:
        self.workDir = tempfile.mkdtemp(prefix="DeepSSM-")
        return self.workDir

    def _launch(self, task: str, args: list[str], device: str) -> None:
        """Start the worker; if the process cannot start, clean up and raise a clear error."""
        self.task = task
        self.lastTrainedBundle = None
        try:
            self.runner.start(worker_command(self.python(), task, args), env=worker_environment(device))
        except OSError as e:
            self.cleanupTask()
            raise RuntimeError(
                _("could not start the DeepSSM {task} process: {error}").format(task=task, error=e)
            ) from e

    def startPrediction(
        self,
        volume: Any,
        bundlePath: str,
        device: str = "auto",
        aligned: bool = False,
        groundTruth: Any = None,
        normalParticles: list[str] | None = None,
    ) -> None:
        """Export the volume (LPS NRRD) and launch the worker; results arrive in :meth:`finish`.

        The ground truth is read in world coordinates and mapped into the volume's frame, so
        the error heatmap is right whatever parent transforms the two nodes have.
        """
        if volume is None:
            raise ValueError(_("Select an input volume."))
        bundlePath = resolve_bundle_path(bundlePath) if bundlePath else ""
        if not bundlePath:
            raise ValueError(_("Select a model bundle (folder, its model.json, or .zip)."))
        self.ensureRequirements()
        from DeepSSMLogic import io

        work = self._newWorkDir()
        try:
            image = os.path.join(work, "input.nrrd")
            io.write_image(mrml.volume_to_sitk(volume), image)
            args = ["--bundle", bundlePath, "--image", image, "--out", os.path.join(work, "out")]
            args += ["--device", device]
            if aligned:
                args.append("--aligned")
            if groundTruth is not None and groundTruth.GetNumberOfControlPoints():
                gt = os.path.join(work, "ground_truth.csv")
                io.write_particles(gt, mrml.markups_to_particles_in_frame_of(groundTruth, volume))
                args += ["--ground-truth", gt]
            if normalParticles:
                args += ["--normal-particles", *[str(p) for p in normalParticles]]
        except BaseException:
            self.cleanupTask()
            raise
        self._volume, self._bundle = volume, bundlePath
        self._launch("predict", args, device)

    def startTraining(
        self,
        cohort: str,
        outputBundle: str,
        variant: str,
        loss: str,
        epochs: int,
        batchSize: int,
        device: str,
        augmentCount: int,
        sampler: str,
        online: bool,
        *,
        domain: str = "",
        particles: str = DEFAULT_PARTICLES,
        frame: str = DEFAULT_FRAME,
        imageColumn: str = "",
        allowImageOnly: bool = False,
    ) -> Any:
        """Launch training in the background; returns the live loss chart node.

        ``domain`` ... ``allowImageOnly`` are the shared cohort options of ``deepssm train``
        (``DeepSSMLogic.commands._cohort_args``); only values other than the defaults are passed on.
        """
        if not cohort or not os.path.exists(cohort):
            raise ValueError(_("Select an existing cohort file: {cohort}").format(cohort=cohort))
        if not outputBundle:
            raise ValueError(_("Choose where to write the trained bundle."))
        cohortOptions = cohort_option_argv(  # validated before anything is installed
            domain=domain.strip(),
            particles=particles,
            frame=frame,
            image_column=imageColumn.strip(),
            allow_image_only=allowImageOnly,
        )
        self.ensureRequirements()
        args = ["--cohort", cohort, "--out", outputBundle, "--variant", variant, "--loss", loss]
        args += ["--epochs", str(epochs), "--batch-size", str(batchSize), "--device", device]
        args += ["--augment-count", str(augmentCount), "--sampler", sampler]
        if online:
            args.append("--online")
        args += cohortOptions
        self.trainingChart = mrml.plot_chart(
            self.scene,
            "DeepSSM training",
            "epoch",
            ["train_loss", "val_loss", "val_rmse_mm"],
            title="DeepSSM training",
            y_label="loss / RMSE (mm)",
        )
        self._launch("train", args, device)
        return self.trainingChart.chart

    def onProgressMetrics(self, event: Any) -> None:
        """Live curves: one table row per epoch event."""
        if self.task == "train" and self.trainingChart is not None and "epoch" in event.metrics:
            row = {k: v for k, v in event.metrics.items() if isinstance(v, (int, float))}
            row["epoch"] = float(event.done)
            mrml.append_table_row(self.trainingChart.table, row)

    def finish(self, outcome: RunOutcome) -> Any:
        """Turn a successful run's result into nodes (prediction) or a registered bundle (training)."""
        result = outcome.result or {}
        if result.get("kind") == "prediction":
            scene = self.scene
            if mrml.in_scene(self._volume, scene) is None:
                raise InputError(
                    _("the input volume was removed from the scene before the prediction finished")
                )
            nodes = mrml.show_prediction(
                scene, self._volume, result, self.predictions.get(scene, self._volume), self.colourBy
            )
            self.predictions.put(self._volume, nodes)
            self.lastPrediction = dict(result)
            self.lastVerdict = prediction_verdict(result)
            self.shownHeatmap = next(iter(nodes.legends or {}), None)
            self.recentBundles.add(self._bundle)
            self._markSubjectOnExplorer()
            return nodes
        if result.get("kind") == "training":
            self.lastTrainedBundle = result["bundle"]
            self.recentBundles.add(result["bundle"])
            return result["bundle"]
        raise RuntimeError(f"unexpected result from the DeepSSM worker: {sorted(result)}")

    def setColourBy(self, choice: str) -> str | None:
        """Colour the last prediction (surface and point cloud) by ``choice`` (a key of
        ``mrml.HEATMAP_CHOICES``) and remember it for the next ones; returns the array shown
        (None: nothing to colour by, e.g. "uncertainty" from a bundle without it and no other)."""
        if choice not in mrml.HEATMAP_CHOICES:
            raise ValueError(
                _("Colour by must be one of {choices}; found {choice!r}").format(
                    choices=", ".join(mrml.HEATMAP_CHOICES), choice=choice
                )
            )
        self.colourBy = choice
        nodes = self.predictions.get(self.scene, self._volume) if self._volume is not None else None
        if nodes is None:
            return None
        self.shownHeatmap = mrml.apply_heatmap(nodes, choice)
        self.predictions.put(self._volume, nodes)
        return self.shownHeatmap

    def cleanupTask(self) -> None:
        if self.workDir:
            shutil.rmtree(self.workDir, ignore_errors=True)
        self.workDir = None
        self.task = None

    def predictBlocking(
        self,
        volume: Any,
        bundlePath: str,
        device: str = "cpu",
        aligned: bool = False,
        groundTruth: Any = None,
        timeout_s: float = 600.0,
    ) -> Any:
        """Run a prediction to completion (scripts and the self-test); returns the output nodes."""
        self.startPrediction(volume, bundlePath, device, aligned, groundTruth)
        deadline = time.monotonic() + timeout_s
        try:
            while self.runner.poll():
                if time.monotonic() > deadline:
                    self.runner.cancel()
                    raise TimeoutError(
                        _("DeepSSM prediction took longer than {seconds} s").format(seconds=timeout_s)
                    )
                self.processEvents()
                time.sleep(0.05)
            outcome = self.runner.outcome
            if outcome is None or outcome.state is not RunState.SUCCEEDED:
                raise RuntimeError(f"{outcome.error}\n{outcome.details}" if outcome else "no outcome")
            return self.finish(outcome)
        finally:
            self.cleanupTask()

    def loadDemo(self) -> tuple[Any, Any, str]:
        """Load the demo image and ground truth; returns (volume, ground-truth point list, bundle path)."""
        from DeepSSMLogic import io

        image = verified_sample_file("image")
        truth = verified_sample_file("ground_truth")
        bundle = verified_sample_file("bundle")
        scene = self.scene
        volume = mrml.add_volume_from_sitk(scene, io.read_image(image), "DeepSSM demo image")
        gt = mrml.particles_to_markups(
            scene,
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
        scene = self.scene
        node = mrml.add_point_cloud_model(
            scene,
            diff.mean_a,
            "DeepSSM group difference",
            particle_values={"difference_mm": diff.magnitude},
            node=scene.GetFirstNodeByName("DeepSSM group difference"),
        )
        mrml.show_scalar_heatmap(node, "difference_mm", "viridis", title="|B - A| (mm)")
        self.swimPath = dsa.swim_between_groups(a, b)
        self.swimTo(0.0)
        return f"{len(a)} vs {len(b)} shapes; largest mean difference {float(diff.magnitude.max()):.2f} mm"

    def swimTo(self, value: float) -> None:
        """Morph the swim shape live to ``value`` in [0, 1] (A → B)."""
        if self.swimPath is None:
            return
        pts = self.swimPath.at(value)
        if mrml.in_scene(self.swimNode, self.scene) is None:
            self.swimNode = mrml.particles_to_markups(self.scene, pts, "DeepSSM swim")
        else:
            mrml.update_markups_from_particles(self.swimNode, pts)

    def showSeverity(self, normalGroup: str, subjects: str) -> tuple[Any, str]:
        """Severity table of ``subjects`` against ``normalGroup``; returns (table node, summary)."""
        _names, normal = dsa.load_group(normalGroup)
        names, subj = dsa.load_group(subjects)
        scores = dsa.severity_scores(normal, subj)
        scene = self.scene
        table = scene.GetFirstNodeByName("DeepSSM severity") or scene.AddNewNodeByClass(
            "vtkMRMLTableNode", "DeepSSM severity"
        )
        mrml.update_table(table, {"subject": names, "severity (Mahalanobis)": [float(s) for s in scores]})
        return table, f"Severity of {len(names)} subjects against {len(normal)} normal shapes"

    # -- shape-model explorer ---------------------------------------------------------------------
    def showShapeModel(self, bundlePath: str) -> Any:
        """Mean surface of the bundle's shape model, variance-explained plot and, after a PCA
        prediction, the subject's descriptor on each mode. Returns the explorer."""
        from . import explorer

        self.explorer = explorer.ShapeModelExplorer(
            explorer.load_shape_model(resolve_bundle_path(bundlePath))
        )
        descriptor = None
        if self.lastPrediction and self.lastPrediction.get("descriptor_kind", "pca") == "pca":
            descriptor = self.lastPrediction.get("descriptor") or None
        self.explorerNodes = explorer.show_explorer(self.scene, self.explorer, descriptor, self.explorerNodes)
        return self.explorer

    def _markSubjectOnExplorer(self) -> None:
        """After a PCA prediction with the bundle the explorer shows, mark the subject on its modes."""
        from . import explorer

        if self.explorer is None or self.explorerNodes is None or not self.lastPrediction:
            return
        if self.lastPrediction.get("descriptor_kind", "pca") != "pca" or not self._bundle:
            return
        if Path(self._bundle).resolve() != Path(self.explorer.source.path).resolve():
            return
        descriptor = self.lastPrediction.get("descriptor") or None
        self.explorerNodes = explorer.show_explorer(self.scene, self.explorer, descriptor, self.explorerNodes)

    def warpShapeModel(self, sigmas: list[float]) -> None:
        """Move the explorer surface to ``sigmas`` (standard deviations per leading mode)."""
        from . import explorer

        if self.explorer is None or self.explorerNodes is None:
            return
        if mrml.in_scene(self.explorerNodes.surface, self.scene) is None:
            self.explorerNodes = explorer.show_explorer(self.scene, self.explorer, None)
        explorer.update_surface(self.explorerNodes.surface, self.explorer, sigmas)

    def explorerSummary(self) -> str:
        """One line: the variance the shown modes explain (and where the subject lies)."""
        if self.explorer is None:
            return ""
        ratios = self.explorer.variance_explained[: self.explorer.n_modes]
        text = "modes " + ", ".join(f"{k + 1}: {100 * r:.1f}%" for k, r in enumerate(ratios))
        if self.explorerNodes is not None and self.explorerNodes.subject_table is not None:
            z = mrml.table_columns(self.explorerNodes.subject_table)["subject (SD)"]
            text += "; subject " + ", ".join(f"{v:+.1f} SD" for v in z)
        return text
