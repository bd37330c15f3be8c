"""Seeded synthetic medical image-text data, written in the publishers' own file layouts (DATA.md).

The package: ``scene`` (what an image shows), ``render`` (drawing it), ``text`` (captions and questions),
``files`` (deterministic writing), ``writers/<layout>`` (one module per publisher layout) and ``generate`` (the
entry point and the ``umd-synthetic`` command; ``python -m umd_lightning.data.synthetic`` runs it too).

Every image is a dark "scan" whose content its texts describe, so a model trained on it can learn something:

* **Lesions**: one or two filled shapes (``circle`` / ``square`` / ``triangle``, never the same shape twice in
  an image), each in its own region (``upper left``, ``upper right``, ``lower left``, ``lower right``,
  ``centre``; see :func:`region_box`) with an intensity: ``bright`` (grey level 215-245) or ``dim`` (125-150).
  Everything else stays below grey level 95, so a threshold finds the lesions.
* **Organ** (``chest`` / ``abdomen`` / ``head``): a faint texture inside the body: horizontal ribs, a grid of
  dots (bowel), or an inner ring (skull).
* **Plane** (``axial`` / ``coronal`` / ``sagittal``): the body outline is a wide ellipse, a tall ellipse, or a
  rounded square.
* **Modality** (``CT`` / ``MRI``): CT is sharp with little noise; MRI is blurred, brighter inside the body and
  noisier. MIMIC-CXR images use a third style, a chest radiograph (``XR``: grey body, brighter ribs).

Captions name the modality, organ (sometimes the plane) and every lesion ("CT of the chest showing a bright
circle in the upper left and a dim triangle in the centre."). VQA pairs ask about the same facts, closed
(``yes``/``no``: is there a <shape>, is there a lesion on the <side> side, is this a CT scan, is the <shape>
bright) and open (what shape is in the <region>, where is the <shape>, how many lesions, what organ, what
modality, what plane); see :func:`questions`.

Layouts, by the folder each writes under ``out`` (``generate`` returns these, the roots a loader takes):

``roco``
    ROCO: ``{train,validation,test}/radiology/captions.txt`` (``ROCO_<id>\t <caption>``),
    ``images/ROCO_<id>.jpg`` and ``keywords.txt``. Every 8th caption has under 3 words (``CT chest``), every
    3rd carries stray spaces.
``medicat``
    MedICaT: ``release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl`` and
    ``release/figures/<pdf_hash>_<fig_uri>`` (RGB PNG). Every 4th figure is a bar chart with
    ``radiology: false``; ``s2orc_references`` is null for every 5th, else 1-3 strings, some under 3 words.
``mimic_cxr``
    MIMIC-CXR(-JPG): ``files/p<NN>/p<subject_id>/s<study_id>/<dicom_id>.jpg``, reports
    ``files/p<NN>/p<subject_id>/s<study_id>.txt`` (FINDINGS and IMPRESSION; every 6th study lacks both, others
    one of them), ``mimic-cxr-2.0.0-metadata.csv`` (``ViewPosition`` PA/AP/LATERAL, lateral views drawn with
    the sagittal outline) and ``mimic-cxr-2.0.0-split.csv`` (train/validate/test, by subject). Some studies
    have no lesion ("No focal lesion.").
``vqa_rad``
    VQA-RAD official: ``VQA_RAD Dataset Public.json`` (indent 3, the release's fields; the first ``qid`` a
    string, some count answers JSON numbers, ``Yes``/``yes`` mixed, one ``"CLOSED "``) and
    ``VQA_RAD Image Folder/synpic<N>.jpg``. The last 20 % of images carry ``test_freeform``/``test_para``
    questions; a ``para`` record rephrases the ``freeform`` one before it.
``vqa_rad_preprocessed``
    The same records (fewer fields) as ``trainset.json``, ``testset.json``, ``valset.json`` (a copy of the
    test set, as M3AE ships it) and ``images/``.
``slake``
    SLAKE 1.0: ``{train,validate,test}.json`` (indent 4, UTF-8) and ``imgs/xmlab<N>/source.jpg``. Every 4th
    image of a split has only Chinese (``zh``) questions; every 3rd English image also asks about an empty
    region, answered with the literal string ``"None"``.
``melinda``
    MELINDA: ``{train,dev,test}.csv`` and ``melinda_images/PMC<id>_F<k>.jpg`` (RGB). One lesion per image;
    ``i_meth_label`` is the modality (``CT``/``MRI``), ``p_meth_label`` the lesion's shape, cycled so that the
    training split holds every class.
``vqa_med_2019``
    ImageCLEF VQA-Med 2019 official: ``ImageClef-2019-VQA-Med-Training/`` with ``Train_images/`` and
    ``QAPairsByCategory/C{1..4}_{Modality,Plane,Organ,Abnormality}_train.txt``, validation likewise
    (``ImageClef-2019-VQA-Med-Validation/``, ``Val_images/``, ``_val``), and ``VQAMed2019Test/`` with
    ``VQAMed2019_Test_Images/`` and ``VQAMed2019_Test_Questions_w_Ref_Answers.txt``
    (``image_id|category|question|answer``). One lesion, one question per category per image, lower case.
``vqa_med_2019_m3ae``
    The same questions in M3AE's layout: ``{train,val,test}/QA/{Modality,Organ,Plane}.csv``
    (``image_id|question|answer``) and ``{split}/images/<image_id>.jpg``.
``jsonl``
    Generic JSONL: ``data.jsonl`` (``image`` a relative path, every 5th an RGB PNG; ``text`` a string or,
    every 3rd record, a list of two strings; ``split`` in train/val/test) and ``images/``.

``generate(layouts=...)`` names ``vqa_rad`` and ``vqa_med_2019`` once each; each writes both its folders.
Splits are about 70/15/15 % of the images (80/20 for VQA-RAD), each holding at least one. The output is a pure
function of the arguments: numpy ``Generator`` streams seeded from ``(seed, layout)`` (so a layout's bytes
do not depend on which others are written), PIL drawing, JPEG quality 90, no time stamps.
"""

from umd_lightning.data.synthetic.generate import LAYOUTS, MIN_IMAGES, OUTPUT_FOLDERS, generate, main
from umd_lightning.data.synthetic.render import render, render_chart
from umd_lightning.data.synthetic.scene import (
    INTENSITIES,
    MODALITIES,
    ORGANS,
    PLANES,
    REGIONS,
    SHAPES,
    Lesion,
    Scene,
    random_scene,
    region_box,
)
from umd_lightning.data.synthetic.text import QA, caption, questions

__all__ = [
    "INTENSITIES",
    "LAYOUTS",
    "MIN_IMAGES",
    "MODALITIES",
    "ORGANS",
    "OUTPUT_FOLDERS",
    "PLANES",
    "QA",
    "REGIONS",
    "SHAPES",
    "Lesion",
    "Scene",
    "caption",
    "generate",
    "main",
    "questions",
    "random_scene",
    "region_box",
    "render",
    "render_chart",
]
