"""Dataset runs: a model applied to a whole dataset in compiled batches, sharded over
devices and processes, streamed to disk, resumable, and published only when complete.

One machinery serves every run:

- `lrpjax.runs.store`: the output folder's lock, run keys, work folders, manifests,
  memmapped arrays, merging the processes' shares, and the publish step;
- `lrpjax.runs.batches`: the sharded compiled step, padded batches, chunks and shares, and
  the chunk loop that streams a step's results into the declared arrays;
- `lrpjax.runs.distributed`: several JAX processes' phases and failures.

The runs declare their arrays to it and derive their results from them:
`lrpjax.runs.explain` (``lrpjax explain``, `explain_dataset`) and `lrpjax.runs.concepts`
(``lrpjax concepts``, `concepts_dataset`).
"""
