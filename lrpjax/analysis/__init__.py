"""What is computed from explanations: baselines to compare LRP with, metrics that score
maps, concepts (Concept Relevance Propagation) and the evaluation that ranks explainers.
Built on `lrpjax.core` and the models; knows nothing of files or the command line."""
