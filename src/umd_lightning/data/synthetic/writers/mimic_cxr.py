"""The mimic_cxr layout (see the package docstring for its files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umd_lightning.data.synthetic.files import _hex_id, _save_jpeg, _split_names, _write_csv, _write_text
from umd_lightning.data.synthetic.render import render
from umd_lightning.data.synthetic.scene import Scene, random_scene


def _mimic_report(scene: Scene, sections: str) -> str:
    count = len(scene.lesions)
    if count:
        findings = "There is " + " and ".join(lesion.phrase() for lesion in scene.lesions) + "."
        shapes = " and ".join(lesion.shape for lesion in scene.lesions)
        impression = f"{('One', 'Two')[count - 1]} focal lesion{'s' if count > 1 else ''}: {shapes}."
    else:
        findings, impression = "The lungs are clear. No focal lesion.", "No focal lesion."
    parts = [
        "                                 FINAL REPORT",
        " EXAMINATION:  CHEST (PA AND LAT)",
        "",
        " INDICATION:  ___ with cough.",
        "",
        " TECHNIQUE:  Chest PA and lateral",
        "",
        " COMPARISON:  None.",
        "",
    ]
    if sections in ("both", "findings"):
        parts += [" FINDINGS:", "", f" {findings} Heart size is normal.", ""]
    if sections in ("both", "impression"):
        parts += [" IMPRESSION:", "", f" {impression}", ""]
    if sections == "neither":
        parts += [f" {findings}", ""]  # free text without the section headers a loader looks for
    return "\n".join(parts)


def _write_mimic_cxr(root: Path, n: int, size: int, rng: np.random.Generator) -> None:
    studies: list[tuple[int, Scene, list[tuple[str, str]]]] = []  # (study_id, scene, [(dicom_id, view)])
    images = 0
    study_ids = iter(50_000_000 + rng.choice(10_000_000, size=n, replace=False))
    while images < n:
        views = [("PA", "AP")[int(rng.integers(2))]]
        if images + 2 <= n and rng.random() < 0.4:
            views.append("LATERAL")
        images += len(views)
        scene = random_scene(rng, min_lesions=0, modality="XR", organ="chest", plane="coronal")
        studies.append((int(next(study_ids)), scene, [(_hex_id(rng, (8,) * 5), view) for view in views]))
    # Group consecutive studies into subjects (1-2 each), keeping at least three subjects for three splits.
    subjects: list[list[int]] = []
    for index in range(len(studies)):
        if not subjects or len(studies) <= 4 or len(subjects[-1]) == 2 or rng.random() < 0.5:
            subjects.append([])
        subjects[-1].append(index)
    subject_ids = 10_000_000 + rng.choice(10_000_000, size=len(subjects), replace=False)
    splits = _split_names(len(subjects), ("train", "validate", "test"))
    metadata, split_rows = [], []
    for subject_id, split, members in zip(subject_ids, splits, subjects):
        subject = f"p{subject_id}"
        folder = root / "files" / subject[:3] / subject
        for index in members:
            study_id, scene, dicoms = studies[index]
            sections = ("both", "both", "findings", "impression", "both", "neither")[index % 6]
            _write_text(folder / f"s{study_id}.txt", [_mimic_report(scene, sections)])
            date = f"21{int(rng.integers(10, 90))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
            for dicom_id, view in dicoms:
                view_scene = (
                    Scene(scene.modality, scene.organ, "sagittal", scene.lesions) if view == "LATERAL" else scene
                )
                _save_jpeg(render(view_scene, size, rng), folder / f"s{study_id}" / f"{dicom_id}.jpg")
                view_name = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}[view]
                metadata.append(
                    [
                        dicom_id,
                        subject_id,
                        study_id,
                        "CHEST (PA AND LAT)",
                        view,
                        size,
                        size,
                        date,
                        f"{int(rng.integers(0, 240000)):06d}.000",
                        "CHEST (PA AND LAT)",
                        view_name,
                        "Erect",
                    ]
                )
                split_rows.append([dicom_id, study_id, subject_id, split])
    header = [
        "dicom_id",
        "subject_id",
        "study_id",
        "PerformedProcedureStepDescription",
        "ViewPosition",
        "Rows",
        "Columns",
        "StudyDate",
        "StudyTime",
        "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ]
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv", header, metadata)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
