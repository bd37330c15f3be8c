"""Publisher readers, one module per data set: ``roco``, ``medicat``, ``mimic_cxr``, ``medpix``, ``jsonl`` (pre-training
sources, registered in ``data/pretrain.py``), ``vqa_rad``, ``slake``, ``vqa_med_2019`` (VQA), ``melinda``,
``medmnist`` (classification). Each reads its files once with the rules of ``data/files.py`` and ``data/common.py``;
ROCO and MedPix also serve retrieval (and MedPix classification) from the same module. Sources import no task
module (``tests/test_import_graph.py``)."""
