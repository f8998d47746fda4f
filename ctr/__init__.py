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

One module per chapter, named as its notebook (``book/<name>.ipynb``), in ``ctr/chapters``:
  sinks (+ sinks_verdicts, sinks_figures)       variance (+ variance_verdicts)
  probes (+ probes_features, probes_stats, probes_verdicts)
  taxonomy    qknorm    toy_theory (+ toy_theory_figures, toy_model)
  toy_multihead (+ toy_multihead_figures)      release (+ release_means, release_prompts,
  release_swap, release_verdicts)              scale     adapt     reuse (shared by two pages)

The book machinery, in ``ctr/book``: runner (papermill + jupyter-book, ``python -m ctr.book``),
cache (when a chapter must re-run), present (the rerun box), htmlcheck (headless Chromium),
explorer (the interactive attention figure), scorecard (gathers every chapter's verdicts).
"""
