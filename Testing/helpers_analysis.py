"""Fixtures for the analysis/report tests: a small labelled particle cohort on disk (tiny images,
no synthetic-image generation, fast) and a trained cranium bundle (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def sphere_points(m: int = 120, radius: float = 10.0) -> np.ndarray:
    k = np.arange(m) + 0.5
    phi = np.arccos(1 - 2 * k / m)
    theta = np.pi * (1 + 5**0.5) * k
    return radius * np.c_[np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)]


def population(n: int, rng: np.random.Generator, bump=0.0, m: int = 120) -> np.ndarray:
    """``(n, m, 3)`` ellipsoid-like shapes with 4 random smooth modes; ``bump`` (scalar or (n,))
    raises an outward bump around +x whose height is the severity."""
    base = sphere_points(m)
    u = base / np.linalg.norm(base, axis=1, keepdims=True)
    modes = np.stack([u * u[:, [0]], u * u[:, [1]], u * u[:, [2]], u * (u[:, [0]] * u[:, [1]])])
    coef = rng.normal(size=(n, 4)) * [1.0, 0.8, 0.6, 0.4]
    shapes = base[None] + np.einsum("nk,kmi->nmi", coef, modes)
    shapes = shapes + rng.normal(scale=0.05, size=shapes.shape)
    b = np.broadcast_to(np.asarray(bump, dtype=np.float64), (n,))[:, None, None]
    return shapes + b * np.exp(-((u[:, 0] - 1) ** 2) / 0.1)[None, :, None] * u[None]


def write_particle_cohort(
    root: Path, n_normal: int = 14, n_bump: int = 12, seed: int = 0, mesh: bool = True
) -> Path:
    """A cohort.csv with particles, groups ``normal``/``bump``, a ``severity`` column (the bump
    height), train/test splits, 4³ placeholder images and (optionally) one subject mesh."""
    import SimpleITK as sitk

    from DeepSSMLogic.io import polydata_from_arrays, write_mesh, write_particles

    rng = np.random.default_rng(seed)
    sev = np.r_[np.zeros(n_normal), np.linspace(1.0, 3.0, n_bump)]
    shapes = np.concatenate([population(n_normal, rng), population(n_bump, rng, bump=sev[n_normal:])])
    root.mkdir(parents=True, exist_ok=True)
    img = sitk.Image(4, 4, 4, sitk.sitkFloat32)
    sitk.WriteImage(img, str(root / "placeholder.nrrd"))
    rows = ["id,image,particles,mesh,group,split,severity"]
    order = rng.permutation(len(shapes))
    test = set(order[: len(shapes) * 2 // 5].tolist())
    for i, shape in enumerate(shapes):
        write_particles(root / f"s{i:02d}.particles", shape)
        mesh_col = ""
        if mesh and i == 0:
            from scipy.spatial import ConvexHull

            tri = ConvexHull(shape).simplices
            a, b, c = shape[tri[:, 0]], shape[tri[:, 1]], shape[tri[:, 2]]
            outward = np.einsum("ij,ij->i", np.cross(b - a, c - a), a - shape.mean(axis=0)) > 0
            tri[~outward] = tri[~outward][:, ::-1]  # consistent outward winding
            write_mesh(polydata_from_arrays(shape, tri), root / "s00.vtk")
            mesh_col = "s00.vtk"
        group = "normal" if sev[i] == 0 else "bump"
        split = "test" if i in test else "train"
        rows.append(f"s{i:02d},placeholder.nrrd,s{i:02d}.particles,{mesh_col},{group},{split},{sev[i]:.4f}")
    (root / "cohort.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "cohort.csv"


def png_has_content(path: Path, min_fraction: float = 0.01) -> bool:
    """The PNG exists, is non-empty and has at least ``min_fraction`` non-background pixels
    (background = the most common colour)."""
    from PIL import Image

    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return False
    arr = np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(arr, axis=0, return_counts=True)
    background = colours[np.argmax(counts)]
    return float(np.mean(np.any(arr != background, axis=1))) >= min_fraction


def trained_cranium_bundle(
    root: Path, n: int = 40, epochs: int = 50, augment: int = 200
) -> tuple[Path, Path]:
    """``(cohort.csv, bundle)``: a small cranium cohort (48³ @ 2 mm images, 128 particles) and a
    Base-DeepSSM trained on a 4 mm grid with KDE augmentation by the project's own pipeline
    (reused when ``root`` already holds both). Measured: held-out RMSE 0.55 mm, severity from its
    predictions AUC 1.0 / Pearson 0.95; 25 epochs learn only 3 of the 6 modes (AUC 0.69)."""
    from DeepSSMLogic import synthetic
    from DeepSSMLogic.pipeline import TrainingOptions, train_model

    cohort = root / "cohort" / "cohort.csv"
    model = root / "model"
    if not cohort.exists():
        synthetic.generate_cohort(
            "cranium",
            n,
            root / "cohort",
            seed=0,
            image_size=(48, 48, 48),
            spacing=2.0,
            n_particles=128,
            split=(0.6, 0.1, 0.3),
        )
    if not (model / "model.json").exists():
        train_model(
            cohort,
            model,
            TrainingOptions(
                epochs=epochs,
                batch_size=4,
                augment=augment,
                spacing=4.0,
                device="cpu",
                seed=0,
                conv_padding="same",
            ),
        )
    return cohort, model


def untrained_tl_bundle(cohort_csv: Path, path: Path) -> Path:
    """An untrained TL-DeepSSM bundle on the cohort's training grid, with a template mesh (fast;
    for plumbing tests of the latent-descriptor paths, not for accuracy)."""
    import torch

    from DeepSSMLogic.bundle import save_bundle
    from DeepSSMLogic.cohort import load_cohort
    from DeepSSMLogic.networks import TLDeepSSM
    from DeepSSMLogic.pipeline import (
        mean_reference_image,
        prepare_training_arrays,
        reference_grid,
        template_mesh_for,
    )
    from DeepSSMLogic.preprocess import IntensityNormalizer

    torch.manual_seed(0)
    cohort = load_cohort(cohort_csv)
    train = cohort.by_split("train")
    grid = reference_grid(cohort.particles(train), 8.0, 8.0)
    arrays = prepare_training_arrays(train, grid)
    mean = arrays.particles.mean(axis=0)
    net = TLDeepSSM(
        grid.shape_zyx,
        mean.shape[0],
        latent_dim=6,
        particle_mean=mean,
        particle_scale=10.0,
        hidden=32,
        conv_padding="same",
    ).eval()
    # The head starts at zero (every image → the mean latent); random weights give distinct shapes.
    torch.nn.init.xavier_normal_(net.tflank.fc[-1].weight)
    template = template_mesh_for(train, arrays.particles, mean)
    return save_bundle(
        path,
        net,
        net.architecture,
        grid,
        IntensityNormalizer.fit(arrays.images),
        None,
        mean_reference_image(arrays.images, grid),
        template[0] if template else None,
        {"note": "untrained TL test bundle"},
        template_particles=template[1] if template else None,
        mean_particles=mean,
    )
