"""``python -m umd_lightning.data.synthetic OUT [--layouts a,b] ...``: the ``umd-synthetic`` command."""

from umd_lightning.data.synthetic.generate import main

main()
