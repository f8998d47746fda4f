"""ctr: the package behind the "Catch, Tag, Release" book. Its layout is the book's.

Where each equation of the paper lives (``ctr/definitions.py``, named as in the paper):
  sink score alpha_t (Sec. 2) ........ definitions.alpha        (book: sinks, eq. eq-alpha)
  sinks S = {t : alpha_t > eps} ...... definitions.sinks
  tags v_s, s in S ................... definitions.tags
  z_tag / z_notag .................... definitions.z_tag, z_notag
  variance explained VE .............. definitions.variance_explained  (book: variance, eq-ve)
  random-subspace baseline ........... definitions.random_subspace_ve
  mass-mean probe (Marks & Tegmark) .. definitions.mass_mean_fit / _predict

Core (no book machinery):
  definitions  the paper's equations            stats     intervals and tests behind verdicts
  models       load a model (eager attention,   verdicts  the verdict vocabulary and rules
               BOS policy, embedded registry)   data      prompt sets generated offline
  gguf         embedded models from PyPI wheels results   results files; the paper's numbers
  arch         layers / attention / W_O found              (paper_numbers.yaml)
               by looking at the model          plots     figures shared by chapters
  extract      the one way into a model: read   prose     numbers glued into chapter prose
               (layers, prefix caching) and     tiny      tiny random models for tests
               write (run with edits, loss)     bench     the benchmark script
  analysis     per-head sinks and VE, batched

One package (or module) per chapter, named as its notebook (``book/<name>.ipynb``), in
``ctr/chapters``; the package's ``__init__`` runs the experiment, its modules judge and draw:
  sinks/          measures, verdicts, figures
  variance/       verdicts, figures
  probes/         features, stats, verdicts, tables, figures
  taxonomy/       verdicts, figures
  qknorm/         figures
  toy_theory/     verdicts, figures        (the toy model itself: toy_model, shared)
  toy_multihead/  verdicts, figures
  release/        means, prompts, swap, verdicts, figures
  adapt/          paper (the paper-models section)
  scale           (a module)               reuse  numbers one chapter computes, another shows
Rules: ``rules`` reads RULES.md (the pre-registered verdict rules); every ``verdicts`` module
applies them through ``ctr.verdicts`` (vocabulary, parts, across models) and ``ctr.stats``.

The book machinery, in ``ctr/book``: ``commands`` (``python -m ctr.book``), ``execute``
(papermill, staged results, private kernels), ``lock``, ``params``/``values`` (parameters checked
before a kernel starts), ``cache``/``deps``/``fingerprint`` (when a chapter must re-run),
``rendering`` (jupyter-book), ``present`` (the rerun and non-default boxes), ``htmlcheck``
(headless Chromium), ``explorer`` (the attention figure), ``scorecard`` and ``front`` (the
verdict pages).
"""
