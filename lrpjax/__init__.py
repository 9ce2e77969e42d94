"""lrpjax: Layer-wise Relevance Propagation for Flax NNX models."""
