"""The LRP engine and its parts; nothing here imports from the rest of lrpjax.

`layers` (parameter-free layers) and `layer_types` (the one module that knows layer types)
at the bottom; `rules` on affine views of them; `composites` (which rule where) with
`canonizers` (model rewrites); `jaxprs` (helpers on traced programs), `glue` (relevance
through the code between layers) and `tracing` (the model as probed units); `engine`
(`explain`, `explainer`) on top; `compilation` (XLA options at the edge) and `linen`
(Linen models as NNX layers) beside it.
"""
