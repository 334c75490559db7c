"""The options every command that reads a cohort shares, defined once: ``--domain``, ``--particles``,
``--frame``, ``--image-column``, ``--allow-image-only`` (:func:`add_cohort_options`,
:func:`cohort_from_args`), and the project's ``deepssm`` settings as defaults that the command line
overrides (:func:`track_defaults`, :func:`apply_project_settings`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

COHORT_OPTION_DESTS = ("domain", "particles", "frame", "image_column", "allow_image_only")
# choices and defaults, shared with the Slicer panel (DeepSSM.py, DeepSSMLib.controller)
PARTICLE_CHOICES = ("local", "world")
DEFAULT_PARTICLES = "local"
FRAME_CHOICES = ("auto", "local", "world")
DEFAULT_FRAME = "auto"


def add_cohort_options(parser: argparse.ArgumentParser, *, image_only_help: str | None = None) -> None:
    """Add the shared cohort options to ``parser`` (one argument group)."""
    group = parser.add_argument_group("cohort (ShapeWorks projects)")
    group.add_argument("--domain", help="projects with several domains (anatomies): the one to model")
    group.add_argument(
        "--particles",
        choices=PARTICLE_CHOICES,
        default=DEFAULT_PARTICLES,
        help="which particle files to read (default local; the --frame decides the training frame)",
    )
    group.add_argument(
        "--frame",
        choices=FRAME_CHOICES,
        default=DEFAULT_FRAME,
        help=(
            "frame to train/evaluate in: world = ShapeWorks' aligned frame (procrustes @ alignment @ "
            "local, images resampled with the same transform), local = each image's own space; auto "
            "(default): world when the project has alignment/procrustes transforms"
        ),
    )
    group.add_argument(
        "--image-column",
        help="the column holding the images (default: the first image_*, else feature_* column); "
        "a segmentation/groomed column is accepted with a warning",
    )
    group.add_argument(
        "--allow-image-only",
        action="store_true",
        help=image_only_help
        or "accept subjects without particles (new images to predict); they count as the test split",
    )


def cohort_option_argv(
    *,
    domain: str = "",
    particles: str = DEFAULT_PARTICLES,
    frame: str = DEFAULT_FRAME,
    image_column: str = "",
    allow_image_only: bool = False,
) -> list[str]:
    """The command-line words for the shared options (the inverse of :func:`add_cohort_options`),
    only those that differ from the defaults; "" for ``domain``/``image_column`` means the default
    (first domain / ShapeWorks' image column)."""
    if particles not in PARTICLE_CHOICES:
        raise ValueError(f"particles must be one of {PARTICLE_CHOICES}, got {particles!r}")
    if frame not in FRAME_CHOICES:
        raise ValueError(f"frame must be one of {FRAME_CHOICES}, got {frame!r}")
    argv: list[str] = []
    if domain:
        argv += ["--domain", domain]
    if particles != DEFAULT_PARTICLES:
        argv += ["--particles", particles]
    if frame != DEFAULT_FRAME:
        argv += ["--frame", frame]
    if image_column:
        argv += ["--image-column", image_column]
    if allow_image_only:
        argv.append("--allow-image-only")
    return argv


def cohort_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``cohort.load_cohort`` from the shared options."""
    return {
        "particles": getattr(args, "particles", DEFAULT_PARTICLES),
        "domain": getattr(args, "domain", None),
        "image_column": getattr(args, "image_column", None),
        "frame": getattr(args, "frame", DEFAULT_FRAME),
        "require_particles": not getattr(args, "allow_image_only", False),
    }


def cohort_from_args(args: argparse.Namespace, path: str | None = None, **overrides: Any) -> Any:
    """Load ``path`` (default ``args.cohort``) with the shared options; ``overrides`` win."""
    from ..cohort import load_cohort

    kwargs = cohort_kwargs(args)
    kwargs.update(overrides)
    return load_cohort(path if path is not None else args.cohort, **kwargs)


def cohort_header(cohort: Any) -> list[str]:
    """Lines every command prints about a loaded cohort: frame (and why), excluded rows, notes."""
    lines = [f"Frame: {cohort.frame} ({cohort.frame_reason})"] if cohort.frame_reason else []
    if cohort.excluded:
        lines.append(f"Excluded (skipped, as ShapeWorks does): {', '.join(cohort.excluded)}")
    lines += [f"Note: {n}" for n in cohort.notes]
    return lines


# -- project settings as defaults ----------------------------------------------------------------
class _Default:
    """A parser default not given on the command line (so a project setting may replace it)."""

    def __init__(self, value: Any):
        self.value = value

    def __str__(self) -> str:  # what %(default)s shows in --help
        return str(self.value)


def track_defaults(parser: argparse.ArgumentParser, dests: Sequence[str]) -> None:
    """Mark the defaults of ``dests`` so :func:`apply_project_settings` can tell them from values
    the user typed (even when equal to the default)."""
    for action in parser._actions:
        if action.dest in dests and not isinstance(action.default, _Default):
            action.default = _Default(action.default)


Converter = Callable[[str], Any]
# ShapeWorks' deepssm settings (Studio/DeepSSM/DeepSSMParameters.cpp) → our option, with a converter
SAMPLERS = {"gaussian": "gaussian", "mixture": "gmm", "kde": "kde"}
PROJECT_SETTINGS: dict[str, tuple[str, Converter]] = {
    "train_epochs": ("epochs", lambda v: int(float(v))),
    "train_batch_size": ("batch_size", lambda v: int(float(v))),
    "aug_num_samples": ("augment", lambda v: int(float(v))),
    "aug_sampler_type": ("sampler", lambda v: SAMPLERS[v.strip().lower()]),
    "spacing": ("spacing", lambda v: float(v.split()[0])),
    "validation_split": ("val_fraction", lambda v: float(v) / 100.0),
}
# settings that go to --extra (TrainConfig fields)
PROJECT_EXTRA: dict[str, tuple[str, Converter]] = {
    "train_learning_rate": ("lr", float),
}


def apply_project_settings(args: argparse.Namespace, cohort: Any) -> list[str]:
    """Fill options the user did not type from the project's ``deepssm`` settings, unwrap the other
    defaults, and return one line per setting saying where it came from."""
    settings = dict(getattr(cohort, "settings", {}) or {})
    report: list[str] = []
    for key, (dest, convert) in PROJECT_SETTINGS.items():
        if not hasattr(args, dest):
            continue
        current = getattr(args, dest)
        typed = not isinstance(current, _Default)
        if key in settings and settings[key] != "":
            try:
                value = convert(settings[key])
            except (ValueError, KeyError, IndexError):
                report.append(f"  {dest}: project setting {key}={settings[key]!r} not understood; ignored")
                value = None
            if value is not None and not typed:
                setattr(args, dest, value)
                report.append(f"  {dest} = {value!r} (project deepssm sheet: {key}={settings[key]!r})")
                continue
            if value is not None:
                report.append(f"  {dest} = {current!r} (command line; project has {key}={settings[key]!r})")
                continue
        if not typed:
            setattr(args, dest, current.value)
            report.append(f"  {dest} = {current.value!r} (default)")
        else:
            report.append(f"  {dest} = {current!r} (command line)")
    extra = getattr(args, "extra", None)
    if isinstance(extra, list):
        typed_extra = {item.split("=", 1)[0].strip() for item in extra if "=" in item}
        for key, (field, convert) in PROJECT_EXTRA.items():
            if key in settings and settings[key] != "" and field not in typed_extra:
                try:
                    extra.append(f"{field}={convert(settings[key])!r}")
                    report.append(f"  {field} = {settings[key]} (project deepssm sheet: {key})")
                except ValueError:
                    report.append(f"  {field}: project setting {key}={settings[key]!r} not understood")
    for key in ("testing_split",):
        if key in settings:
            report.append(
                f"  {key}={settings[key]} (project) not used: the test split is the rows marked test or "
                "without particles"
            )
    # any remaining tracked defaults (options without a project counterpart)
    for dest, value in vars(args).items():
        if isinstance(value, _Default):
            setattr(args, dest, value.value)
    return report
