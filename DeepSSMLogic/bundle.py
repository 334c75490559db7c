"""The trained model as one self-describing, tamper-evident bundle (a directory or a ``.zip``).

Layout::

    model.json            schema version, architecture (networks.build_network), hyper-parameters,
                          reference grid, intensity normaliser, PCA (mean/basis/eigenvalues and the
                          score whitening), particle count, training summary, sha256 of every file
    weights.pt            the network's state_dict only (loaded with ``weights_only=True``)
    reference_image.nrrd  the registration target on the reference grid (model frame)
    mean.particles        training mean shape, (M, 3) mm, LPS, model frame
    template_mesh.vtk     optional: a surface whose vertices correspond to template.particles
    template.particles    optional: the particles that ``template_mesh.vtk`` was built from

The template mesh is the training subject closest to the mean shape; when ``DeepSSMLogic.mesh``
offers a template warp it has been warped onto the mean particles at training time (then
``template.particles`` equals ``mean.particles``). Predicted meshes warp it from
``template.particles`` to the predicted particles.

Loading verifies the schema version, every file's sha256, a digest of model.json's own content,
that ``weights.pt`` is a plain ``{str: Tensor}`` state_dict and that its keys and shapes match
the architecture. It never unpickles objects.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle_schema import validate_meta
from .errors import BundleError, InputError
from .fileutil import atomic_path, check_replace_target, is_bundle, save_torch, sha256_file
from .geometry import Grid
from .preprocess import IntensityNormalizer

SCHEMA_VERSION = (
    2  # 2: weights.pt may hold float16 tensors (the "weights" section); fp32 bundles still write 1
)
FP32_SCHEMA_VERSION = 1  # what a bundle with float32 weights only records: older releases load it
MODEL_JSON = "model.json"
WEIGHTS = "weights.pt"
REFERENCE_IMAGE = "reference_image.nrrd"
MEAN_PARTICLES = "mean.particles"
TEMPLATE_MESH = "template_mesh.vtk"
TEMPLATE_PARTICLES = "template.particles"
REQUIRED_FILES = (WEIGHTS, REFERENCE_IMAGE, MEAN_PARTICLES)
KNOWN_FILES = REQUIRED_FILES + (TEMPLATE_MESH, TEMPLATE_PARTICLES)

PathLike = str | os.PathLike[str]
DESCRIPTOR_KINDS = {"base": "pca", "tl": "latent"}


@dataclass
class Bundle:
    """A loaded, verified bundle. ``network`` is in eval mode on ``map_location``."""

    path: Path
    meta: dict[str, Any]
    network: Any
    architecture: dict[str, Any]
    grid: Grid
    normalizer: IntensityNormalizer
    shape_model: Any  # shape_model.ShapeModel (PCA + score whitening) or None
    mean_particles: np.ndarray
    reference_image_path: Path
    template_mesh_path: Path | None
    template_particles: np.ndarray | None
    _files_dir: Path = field(repr=False, default=Path("."))
    _cleanup: Any = field(repr=False, default=None)

    @property
    def n_particles(self) -> int:
        return int(self.mean_particles.shape[0])

    @property
    def descriptor_kind(self) -> str:
        """Descriptor type: "pca" (Base-DeepSSM scores, mm) or "latent" (TL-DeepSSM code)."""
        return str(self.meta.get("descriptor_kind", "pca"))

    @property
    def uncertainty(self) -> Any:
        """The :class:`~DeepSSMLogic.uncertainty.UncertaintySpec` (method "none" for bundles without)."""
        from .uncertainty import UncertaintySpec

        return UncertaintySpec.from_dict(
            self.meta.get("uncertainty"), f"{self.path}/{MODEL_JSON}: uncertainty"
        )

    @property
    def ood_calibration(self) -> Any:
        """The :class:`~DeepSSMLogic.ood.OODCalibration`, or None (bundles from before issue 13)."""
        from .ood import OODCalibration

        return OODCalibration.from_dict(self.meta.get("ood"))

    def reference_image(self) -> Any:
        """The reference image (SimpleITK), on the reference grid."""
        from .io import read_image

        return read_image(self.reference_image_path)


# -- digests --------------------------------------------------------------------------------------
def _content_digest(meta: dict[str, Any]) -> str:
    """sha256 of model.json's content, excluding the digest field itself (detects edits)."""
    body = {k: v for k, v in meta.items() if k != "content_sha256"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN/Infinity cannot be in a description this software wrote
        return ""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return _to_jsonable(obj.to_dict())
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return _to_jsonable(asdict(obj))
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# -- saving ---------------------------------------------------------------------------------------
def save_bundle(
    path: PathLike,
    network: Any,
    architecture: dict[str, Any],
    reference_grid: Grid,
    normalizer: IntensityNormalizer,
    shape_model: Any,
    reference_image: Any,
    template_mesh: Any | None = None,
    training_summary: dict[str, Any] | None = None,
    *,
    template_particles: np.ndarray | None = None,
    hyperparameters: dict[str, Any] | None = None,
    mean_particles: np.ndarray | None = None,
    overwrite: bool = False,
    uncertainty: dict[str, Any] | None = None,
    ood: dict[str, Any] | None = None,
    weights_dtype: str = "float32",
) -> Path:
    """Write a bundle atomically to ``path`` (a directory, or a single file when it ends in .zip).

    ``network``: a torch module (its state_dict is saved) or a state_dict; ``architecture``: the
    network's ``architecture`` dict (``networks.build_network`` input); ``shape_model``: the
    training ``ShapeModel`` (PCA + whitening; its mean is the mean shape, (M, 3) mm, model frame)
    or None with ``mean_particles`` given; ``reference_image``: a SimpleITK image or a path (the
    registration target, on ``reference_grid``); ``template_mesh``: vtkPolyData or a path
    (optional) whose corresponding points are ``template_particles`` (default: the mean shape).
    ``uncertainty`` / ``ood``: ``UncertaintySpec.to_dict()`` / ``OODCalibration.to_dict()`` (issue 13;
    ``network`` is then the matching ensemble or dropout network).
    An existing bundle at ``path`` is replaced; anything else is refused (a foreign file is
    replaced with ``overwrite``; a foreign folder never). ``weights_dtype="float16"`` stores the
    image encoder's large tensors as float16 when that provably changes nothing that matters
    (:func:`half_precision_weights`); they load back as float32. Returns the bundle path.
    """
    from . import io

    target = Path(path)
    check_replace_target(target, is_bundle, "DeepSSM model bundle", overwrite=overwrite)
    if mean_particles is None:
        if shape_model is None:
            raise InputError("save_bundle: give a shape_model or mean_particles")
        mean_particles = shape_model.mean
    mean = np.asarray(mean_particles, dtype=np.float64)
    if mean.ndim != 2 or mean.shape[1] != 3:
        raise InputError(f"save_bundle: mean_particles must be (M, 3), found {mean.shape}")
    variant = architecture.get("variant")
    if variant not in DESCRIPTOR_KINDS:
        raise InputError(f"save_bundle: architecture 'variant' must be one of {sorted(DESCRIPTOR_KINDS)}")
    if shape_model is not None:
        pca: dict[str, Any] | None = {
            "meta": _to_jsonable(shape_model.meta),
            **{k: np.asarray(v, dtype=np.float64).tolist() for k, v in shape_model.to_arrays().items()},
        }
    else:
        pca = None
    state = network.state_dict() if hasattr(network, "state_dict") else dict(network)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if weights_dtype not in WEIGHTS_DTYPES:
        raise InputError(
            f"save_bundle: weights_dtype: expected one of {WEIGHTS_DTYPES}, found {weights_dtype!r}"
        )
    weights_info: dict[str, Any] = {"storage": "float32"}
    if weights_dtype == "float16":
        probe = _probe_input(reference_image, normalizer, reference_grid)
        state, weights_info = half_precision_weights(state, architecture, probe, network=network)

    with atomic_path(target, replace_dir=is_bundle) as tmp:
        work = Path(tempfile.mkdtemp(prefix=".bundle.", dir=tmp.parent)) if target.suffix == ".zip" else tmp
        work.mkdir(parents=True, exist_ok=True)
        save_torch(state, work / WEIGHTS)
        if isinstance(reference_image, str | os.PathLike):
            reference_image = io.read_image(reference_image)
        io.write_image(reference_image, work / REFERENCE_IMAGE)
        io.write_particles(work / MEAN_PARTICLES, mean)
        has_template = template_mesh is not None
        if has_template:
            if isinstance(template_mesh, str | os.PathLike):
                template_mesh = io.read_mesh(template_mesh)
            io.write_mesh(template_mesh, work / TEMPLATE_MESH)
            tp = mean if template_particles is None else np.asarray(template_particles, dtype=np.float64)
            if tp.shape != mean.shape:
                raise InputError(
                    f"save_bundle: template_particles {tp.shape} must match mean_particles {mean.shape}"
                )
            io.write_particles(work / TEMPLATE_PARTICLES, tp)
        files = [f for f in KNOWN_FILES if (work / f).exists()]
        meta: dict[str, Any] = {
            "format": "deepssm-bundle",
            "schema_version": SCHEMA_VERSION if weights_info["storage"] == "float16" else FP32_SCHEMA_VERSION,
            "descriptor_kind": DESCRIPTOR_KINDS[variant],
            "architecture": _to_jsonable(architecture),
            "hyperparameters": _to_jsonable(hyperparameters or {}),
            "reference_grid": reference_grid.to_dict(),
            "normalizer": normalizer.to_dict(),
            "n_particles": int(mean.shape[0]),
            "pca": pca,
            "training_summary": _to_jsonable(training_summary or {}),
            "weights": weights_info,
            "files": {f: sha256_file(work / f) for f in files},
        }
        if uncertainty is not None:
            meta["uncertainty"] = _to_jsonable(uncertainty)
        if ood is not None:
            meta["ood"] = _to_jsonable(ood)
        meta["content_sha256"] = _content_digest(meta)
        (work / MODEL_JSON).write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        if work is not tmp:
            _write_zip(work, files, tmp)
            shutil.rmtree(work, ignore_errors=True)
    return target


def _write_zip(folder: Path, files: list[str], zip_path: Path) -> None:
    """model.json then ``files`` of a bundle folder into one flat zip (what :func:`load_bundle` reads)."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in [MODEL_JSON, *files]:
            # float weights barely compress; storing them keeps save/load fast
            zf.write(folder / f, arcname=f, compress_type=zipfile.ZIP_STORED if f == WEIGHTS else None)


def pack_bundle(folder: PathLike, target: PathLike) -> Path:
    """Write the bundle folder ``folder`` as the single-file bundle ``target`` (``.zip``, atomically).

    The folder is verified first (schema, content digest, every file's SHA256), so a damaged or
    edited bundle is refused rather than shipped; the zip holds the same bytes.
    """
    src, out = Path(folder), Path(target)
    if out.suffix != ".zip":
        raise InputError(f"pack_bundle: target {out} must end in .zip")
    if not src.is_dir():
        raise BundleError(f"{src}: not a bundle folder")
    meta = read_bundle_meta(src)
    _verify_description(src, meta)
    files = list(meta["files"])
    for f in files:
        if sha256_file(src / f) != meta["files"][f]:
            raise BundleError(f"{src}/{f}: SHA256 does not match model.json (the file was modified)")
    check_replace_target(out, is_bundle, "DeepSSM model bundle")
    with atomic_path(out, replace_dir=is_bundle) as tmp:
        _write_zip(src, files, tmp)
    return out


# -- float16 storage of the weights -------------------------------------------------------------
WEIGHTS_DTYPES = ("float32", "float16")
FP16_MAX = 65504.0
FP16_MIN_ELEMENTS = 4096  # smaller tensors (biases, batch-norm statistics, PReLU) save nothing: kept fp32
FP16_MAX_RELATIVE_ERROR = 1e-3  # ‖x − fp16(x)‖ / ‖x‖; a normal-range tensor rounds to ~3e-4
FP16_TOLERANCE_MM = 0.01  # most a probe particle may move with the float16 weights


def _encoder_prefix(architecture: dict[str, Any]) -> str:
    """State-dict prefix of the image encoder (the conv stack and its FC layers)."""
    return "tflank." if architecture.get("variant") == "tl" else "encoder."


def _probe_input(reference_image: Any, normalizer: IntensityNormalizer, grid: Grid) -> Any:
    """Network input ``(3, 1, Z, Y, X)``: the normalised reference image and two seeded noisy
    copies of it, to compare predictions of float32 and float16 weights on."""
    import SimpleITK as sitk
    import torch

    from . import io

    image = (
        io.read_image(reference_image) if isinstance(reference_image, str | os.PathLike) else reference_image
    )
    arr = normalizer(sitk.GetArrayFromImage(image).astype(np.float32))
    if arr.shape != grid.shape_zyx:
        raise InputError(
            f"save_bundle: the reference image has {arr.shape} voxels (z, y, x), the grid {grid.shape_zyx}"
        )
    rng = np.random.default_rng(0)
    noisy = [arr + rng.normal(0.0, 0.5, arr.shape).astype(np.float32) for _ in range(2)]
    return torch.from_numpy(np.stack([arr, *noisy])[:, None].copy())


def _probe_particles(
    architecture: dict[str, Any], state: dict[str, Any], probe: Any, network: Any = None
) -> Any:
    """Particles predicted for ``probe`` by ``network`` (a copy, any network type: ensembles and
    dropout heads included) or, for a bare state dict, the network ``architecture`` describes."""
    import copy

    import torch

    from .networks import build_network

    net = (
        copy.deepcopy(network).cpu()
        if hasattr(network, "load_state_dict")
        else build_network(dict(architecture))
    )
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.eval()
    with torch.no_grad():
        return net(probe)[1].double()


def _fp16_refusal(name: str, value: Any, prefix: str) -> str | None:
    """Why the float32 tensor ``value`` stays float32 (None: it may be stored as float16)."""
    import torch

    if not re.sub(r"^members\.\d+\.", "", name).startswith(prefix):  # an ensemble member's encoder too
        return "shape-space layer (its outputs are mm coordinates)"
    peak = float(value.abs().max()) if value.numel() else 0.0
    if peak > FP16_MAX:
        return f"values beyond the float16 range (max |x| {peak:.4g} > {FP16_MAX:g})"
    norm = float(torch.linalg.vector_norm(value))
    err = float(torch.linalg.vector_norm(value - value.half().float()))
    if norm > 0 and err / norm > FP16_MAX_RELATIVE_ERROR:
        return f"float16 would lose accuracy (relative rounding error {err / norm:.2g} > {FP16_MAX_RELATIVE_ERROR:g})"
    return None


def half_precision_weights(
    state: dict[str, Any],
    architecture: dict[str, Any],
    probe: Any,
    tolerance_mm: float = FP16_TOLERANCE_MM,
    network: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, weights_info)``: the image encoder's float32 tensors of ≥ 4096 elements as float16,
    unless a tensor is out of float16's range or rounds badly (it keeps float32, the reason named
    in ``weights_info["float32_kept"]``), and only if the rounded weights move the particles
    predicted for ``probe`` (``(B, 1, Z, Y, X)``, normalised) by at most ``tolerance_mm``;
    otherwise the state is returned unchanged with ``storage: float32`` and the reason. ``network``
    (optional) is the module the state came from, used (copied) for the probe."""
    import torch

    prefix = _encoder_prefix(architecture)
    half: dict[str, Any] = {}
    kept: dict[str, str] = {}
    small = 0
    for name, value in state.items():
        if value.dtype != torch.float32:
            continue
        if value.numel() < FP16_MIN_ELEMENTS:
            small += 1
            continue
        reason = _fp16_refusal(name, value, prefix)
        if reason is None:
            half[name] = value.half()
        else:
            kept[name] = reason
    info: dict[str, Any] = {"storage": "float32", "float32_kept": kept, "tolerance_mm": tolerance_mm}
    if not half:
        info["reason"] = "no encoder tensor qualifies for float16"
        return state, info
    mixed = {k: half.get(k, v) for k, v in state.items()}
    change = (
        _probe_particles(architecture, mixed, probe, network)
        - _probe_particles(architecture, state, probe, network)
    ).abs()
    info["probe_max_change_mm"] = float(change.max())
    if not info["probe_max_change_mm"] <= tolerance_mm:
        info["reason"] = (
            f"float16 encoder weights moved the predicted particles of the reference image by "
            f"{info['probe_max_change_mm']:.3g} mm (more than {tolerance_mm:g} mm): kept float32"
        )
        return state, info
    saved = sum(v.numel() * 2 for v in half.values())
    info.update(
        storage="float16",
        float16_tensors=len(half),
        float32_small_tensors=small,
        bytes_saved=saved,
        probe_mean_change_mm=float(change.mean()),
    )
    return mixed, info


# -- loading --------------------------------------------------------------------------------------
MAX_MODEL_JSON_BYTES = 64 << 20
_CHUNK = 1 << 20


def _entry_cap(name: str, meta: dict[str, Any]) -> int:
    """Most bytes a bundle file can legitimately hold, from what model.json declares (a zip entry
    declaring more is refused before anything is inflated: a zip bomb stays small)."""
    voxels = math.prod(int(v) for v in meta["reference_grid"]["size"])
    n = int(meta["n_particles"])
    caps = {
        MODEL_JSON: MAX_MODEL_JSON_BYTES,
        REFERENCE_IMAGE: voxels * 8 + (1 << 20),  # float64 voxels, uncompressed, plus the header
        MEAN_PARTICLES: n * 3 * 40 + 4096,  # "repr(float) " per coordinate
        TEMPLATE_PARTICLES: n * 3 * 40 + 4096,
        TEMPLATE_MESH: 1 << 30,
    }
    if name == WEIGHTS:
        unc = meta.get("uncertainty") or {}
        members = int(unc.get("members", 1)) if unc.get("method") == "ensemble" else 1
        head = _variance_head_cap(unc.get("head")) if unc.get("method") == "variance" else 0
        return members * _weights_cap(meta["architecture"]) + head
    return caps[name]


def _weights_cap(architecture: dict[str, Any]) -> int:
    """The state_dict size of ``architecture`` (built on torch's meta device: no memory) plus 10 %
    and 1 MiB of archive overhead; 4 GiB when it cannot be built (the load reports that later)."""
    import torch

    from .networks import build_network

    try:
        with torch.device("meta"):
            state = build_network(dict(architecture)).state_dict()
    except Exception:  # a malformed architecture is reported with its field when the network is built
        return 4 << 30
    return int(sum(t.numel() * t.element_size() for t in state.values()) * 1.1) + (1 << 20)


def _variance_head_cap(config: Any) -> int:
    """The variance head's state_dict bytes (float32) plus 10 % (``model.json`` is schema-checked
    before this, so ``config`` is a valid head config)."""
    import torch

    from .variance_head import VarianceHead

    with torch.device("meta"):
        state = VarianceHead.from_config(dict(config)).state_dict()
    return int(sum(t.numel() * 4 for t in state.values()) * 1.1)


def _extract_zip(path: Path, meta: dict[str, Any]) -> Path:
    """Extract the bundle's files into a new temporary folder, streaming each entry in 1 MiB blocks
    with a size cap (:func:`_entry_cap`) and its sha256 checked against model.json as it streams;
    peak memory is one block whatever the zip holds."""
    # only the known flat names are extracted, so a crafted zip cannot write outside ``tmp``
    tmp = Path(tempfile.mkdtemp(prefix="deepssm-bundle-"))
    files = meta["files"]
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            unknown = [i.filename for i in infos if i.filename not in (MODEL_JSON,) + KNOWN_FILES]
            if unknown:
                raise BundleError(f"{path}: unexpected entries in the bundle zip: {unknown}")
            for info in infos:
                if info.filename == MODEL_JSON:
                    continue
                if info.filename not in files:
                    raise BundleError(
                        f"{path}: the zip holds {info.filename}, which model.json does not list"
                    )
                _stream_entry(path, zf, info, _entry_cap(info.filename, meta), files[info.filename], tmp)
    except zipfile.BadZipFile as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"{path}: not a valid zip bundle ({e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _stream_entry(
    path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, digest: str, tmp: Path
) -> None:
    from .errors import format_bytes
    from .fileutil import require_free_space

    name = info.filename
    if info.file_size > cap:
        raise BundleError(
            f"{path}: zip entry {name} declares {format_bytes(info.file_size)}, more than a bundle of this "
            f"architecture, grid and particle count can hold ({format_bytes(cap)}); refusing to inflate it"
        )
    require_free_space(tmp, info.file_size, f"extracting {name} from {path.name}")
    h = hashlib.sha256()
    written = 0
    with zf.open(info) as src, open(tmp / name, "wb") as dst:
        while block := src.read(_CHUNK):
            written += len(block)
            if written > min(cap, info.file_size):
                raise BundleError(f"{path}: zip entry {name} inflates beyond its declared size; refusing it")
            h.update(block)
            dst.write(block)
    actual = h.hexdigest()
    if actual != digest:
        raise BundleError(
            f"{path}: sha256 mismatch for {name} (expected {digest[:12]}…, found {actual[:12]}…); "
            "the file was modified or corrupted"
        )


def _shape_model_from_meta(src: Path, pca: Any) -> Any:
    if not pca:
        return None
    from .shape_model import ShapeModel

    try:
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in pca.items() if k != "meta"}
        return ShapeModel.from_arrays(arrays, pca.get("meta"))
    except (InputError, ValueError, TypeError, AttributeError) as e:
        raise BundleError(f"{src}/{MODEL_JSON}: invalid 'pca' section ({e})") from None


def read_bundle_meta(path: PathLike) -> dict[str, Any]:
    """model.json of a bundle (dir or zip), schema-checked (every field's type, shape and range;
    :mod:`bundle_schema`) but without loading the network."""
    p = Path(path)
    if not p.exists():
        raise BundleError(f"{p}: no such model bundle")
    if p.is_dir():
        mj = p / MODEL_JSON
        if not mj.is_file():
            raise BundleError(f"{p}: missing {MODEL_JSON} (not a DeepSSM model bundle)")
        if mj.stat().st_size > MAX_MODEL_JSON_BYTES:
            raise BundleError(f"{mj}: larger than {MAX_MODEL_JSON_BYTES >> 20} MiB; not a model description")
        raw = mj.read_bytes()
    else:
        try:
            with zipfile.ZipFile(p) as zf:
                info = zf.getinfo(MODEL_JSON)
                if info.file_size > MAX_MODEL_JSON_BYTES:
                    raise BundleError(f"{p}: its {MODEL_JSON} declares {info.file_size} bytes; refusing it")
                with zf.open(info) as f:
                    raw = f.read(MAX_MODEL_JSON_BYTES + 1)
        except KeyError:
            raise BundleError(f"{p}: missing {MODEL_JSON} (not a DeepSSM model bundle)") from None
        except zipfile.BadZipFile:
            raise BundleError(f"{p}: neither a bundle directory nor a valid .zip bundle") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"{p}/{MODEL_JSON}: not valid UTF-8 text (bad byte at offset {e.start})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{p}/{MODEL_JSON}: invalid JSON ({e})") from None
    _check_schema(p, meta)
    validate_meta(meta, f"{p}/{MODEL_JSON}")
    return meta


def _check_schema(p: Path, meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format") != "deepssm-bundle":
        raise BundleError(f"{p}/{MODEL_JSON}: not a DeepSSM model description (format field missing)")
    version = meta.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{p}/{MODEL_JSON}: schema_version must be an integer, found {version!r}")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{p}: bundle schema version {version} is newer than this software supports "
            f"(schema version {SCHEMA_VERSION}); update DeepSSM to load it"
        )
    if version < 1:
        raise BundleError(f"{p}: unknown bundle schema version {version}")


def _verify_description(src: Path, meta: dict[str, Any]) -> None:
    """The digest of model.json's own content, and its files table (known names, required ones)."""
    if meta.get("content_sha256") != _content_digest(meta):
        raise BundleError(f"{src}/{MODEL_JSON}: content digest mismatch (the model description was edited)")
    files = meta["files"]
    for name in files:
        if name not in KNOWN_FILES:
            raise BundleError(f"{src}/{MODEL_JSON}: lists an unknown file {name!r}")
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise BundleError(f"{src}: missing file(s) {sorted(set(missing))}")


def torch_load_reason(exc: BaseException) -> str:
    """Why a ``torch.load(..., weights_only=True)`` failed, in a few words, without torch's advice
    to retry with ``weights_only=False`` (loading untrusted pickles runs arbitrary code)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        reason = next((line.strip() for line in rest if line.strip()), "")
        reason = f"it holds something other than tensors ({reason})" if reason else ""
    elif "Weights only load failed" in text:
        reason = "it holds something other than tensors"
    elif "central directory" in text or "zip archive" in text:
        reason = "the file is truncated or corrupted (not a complete torch archive)"
    else:
        reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
    if not reason or "weights_only" in reason or "trust" in reason:
        reason = type(exc).__name__
    return reason[:300]


def load_state_dict_safely(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load ``weights.pt`` as a plain ``{str: Tensor}`` dict, never unpickling objects."""
    import torch

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        raise BundleError(
            f"{path}: refusing to load weights that are not a plain state_dict of tensors "
            f"({torch_load_reason(e)})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BundleError(
            f"{path}: expected a state_dict mapping names to tensors, found {type(state).__name__}"
        )
    return state


def load_bundle(path: PathLike, map_location: Any = "cpu") -> Bundle:
    """Load and verify a bundle (directory or .zip); raises :class:`BundleError` on any problem."""

    src = Path(path)
    meta = read_bundle_meta(src)
    _verify_description(src, meta)
    if src.is_dir():
        _verify_files(src, src, meta["files"])
        return _load_from_dir(src, src, meta, map_location)
    files_dir = _extract_zip(src, meta)  # verified while streaming
    try:
        missing = [f for f in meta["files"] if not (files_dir / f).is_file()]
        if missing:
            raise BundleError(f"{src}: missing file(s) {sorted(missing)}")
        bundle = _load_from_dir(src, files_dir, meta, map_location)
    except BaseException:
        shutil.rmtree(files_dir, ignore_errors=True)
        raise
    # the extracted files live as long as the Bundle that points at them
    bundle._cleanup = weakref.finalize(bundle, shutil.rmtree, str(files_dir), True)
    return bundle


def _verify_files(src: Path, files_dir: Path, files: dict[str, str]) -> None:
    missing = [f for f in files if not (files_dir / f).is_file()]
    if missing:
        raise BundleError(f"{src}: missing file(s) {sorted(set(missing))}")
    for name, digest in files.items():
        actual = sha256_file(files_dir / name)
        if actual != digest:
            raise BundleError(
                f"{src}: sha256 mismatch for {name} (expected {digest[:12]}…, found {actual[:12]}…); "
                "the file was modified or corrupted"
            )


def _load_from_dir(src: Path, files_dir: Path, meta: dict[str, Any], map_location: Any) -> Bundle:
    """Build the Bundle from verified files (``meta`` schema-checked, digests matched)."""
    try:
        grid = Grid.from_dict(meta["reference_grid"])
        normalizer = IntensityNormalizer.from_dict(meta["normalizer"])
        architecture = dict(meta["architecture"])
        n_particles = int(meta["n_particles"])
    except KeyError as e:
        raise BundleError(f"{src}/{MODEL_JSON}: lacks the field {e.args[0]!r}") from None
    except InputError as e:
        raise BundleError(f"{src}/{MODEL_JSON}: {e}") from None
    shape_model = _shape_model_from_meta(src, meta.get("pca"))

    mean = _read_bundle_particles(src, files_dir, MEAN_PARTICLES, n_particles)
    storage = (meta.get("weights") or {}).get("storage", "float32")
    network = _load_network(src, files_dir, architecture, map_location, meta.get("uncertainty"), storage)
    template_mesh = files_dir / TEMPLATE_MESH if TEMPLATE_MESH in meta["files"] else None
    template_pts = None
    if TEMPLATE_PARTICLES in meta["files"]:
        template_pts = _read_bundle_particles(src, files_dir, TEMPLATE_PARTICLES, n_particles)
    return Bundle(
        path=src,
        meta=meta,
        network=network,
        architecture=architecture,
        grid=grid,
        normalizer=normalizer,
        shape_model=shape_model,
        mean_particles=mean,
        reference_image_path=files_dir / REFERENCE_IMAGE,
        template_mesh_path=template_mesh,
        template_particles=template_pts,
        _files_dir=files_dir,
    )


def _read_bundle_particles(src: Path, files_dir: Path, name: str, n_particles: int) -> np.ndarray:
    """A bundle's particle file, ``(n_particles, 3)`` mm, or a BundleError naming it."""
    from . import io

    try:
        pts = io.read_particles(files_dir / name)
    except InputError as e:
        raise BundleError(str(e)) from None
    if pts.shape != (n_particles, 3):
        raise BundleError(
            f"{src}: {name} has {pts.shape[0]} points, model.json says {n_particles} "
            "(the bundle is damaged: re-save or retrain it)"
        )
    return pts


def _load_network(
    src: Path,
    files_dir: Path,
    architecture: dict[str, Any],
    map_location: Any,
    uncertainty: dict[str, Any] | None = None,
    storage: str = "float32",
) -> Any:
    """The network of ``architecture`` with the bundle's weights (keys, shapes, finiteness checked;
    float16 tensors, allowed when model.json declares ``storage`` float16, back to float32), in
    eval mode on ``map_location``; an ensemble or a network with head dropout when the bundle's
    ``uncertainty`` says so."""
    import torch

    from .uncertainty import UncertaintySpec, build_uncertain_network

    state = load_state_dict_safely(files_dir / WEIGHTS, map_location=map_location)
    halves = [k for k, v in state.items() if v.dtype == torch.float16]
    if halves and storage != "float16":
        raise BundleError(
            f"{src}/{WEIGHTS}: holds float16 tensors ({', '.join(halves[:3])}{' …' if len(halves) > 3 else ''}) "
            f"but model.json declares weights storage {storage!r}; the bundle is inconsistent: re-save it"
        )
    state = {k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}

    try:
        spec = UncertaintySpec.from_dict(uncertainty, f"{src}/{MODEL_JSON}: uncertainty")
        network = build_uncertain_network(architecture, spec)
    except (InputError, KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{src}/{MODEL_JSON}: cannot build the network from 'architecture' ({e})") from None
    expected = network.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: shape {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … ({len(problems)} in all)" if len(problems) > 6 else "")
        raise BundleError(f"{src}/{WEIGHTS}: weights do not match the architecture: {shown}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise BundleError(
            f"{src}/{WEIGHTS}: the network weights contain NaN or Inf ({', '.join(bad[:4])}"
            f"{' …' if len(bad) > 4 else ''}); the training diverged or the file is damaged: retrain the model"
        )
    network.load_state_dict(state, strict=True)
    network.to(torch.device(map_location) if isinstance(map_location, str | torch.device) else "cpu")
    network.eval()
    return network
