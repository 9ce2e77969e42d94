"""The LRP engine and its parts; nothing here imports from the rest of lrpjax.

Each module imports only the ones before it: `layers` (parameter-free layers) and
`layer_types` (the one module that knows layer types) at the bottom; `rules` on affine
views of them; `jaxprs` (helpers on traced programs); `glue` (relevance through the code
between layers, and the glue keys `ACTIVATION`, `PRODUCT`, `SOFTMAX`); `tracing` (the model
as probed units; composites are passed in, not imported); `canonizers` (model rewrites,
which trace the model); `composites` (which rule where, `Composite.resolve`); `structure`
(analyses of the traced program) and `checks` (input checks); `engine` (`explain`,
`explainer`, `resolve_rules`) on top; `compilation` (XLA options at the edge) and `linen`
(Linen models as NNX layers) beside it.
"""
