"""``umd experiment``: a grid of stage runs (rows x data sets x seeds) from one YAML spec, run resumably through
the ``umd`` command (:mod:`.runner`), and its report from the saved results (:mod:`.report`)."""
