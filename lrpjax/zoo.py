"""Small models written the way Flax NNX users write them, for tests and benchmarks.

Each is explained by every preset without changing its code: a CIFAR ResNet (Conv -> BN ->
ReLU, residual additions, BatchNorm called with ``use_running_average``, global average
pooling), a vision transformer (patch embedding, class token, position embedding,
`nnx.MultiHeadAttention`, LayerNorm, GELU MLP), a text transformer on `nnx.Embed` tokens
(causal mask passed to the attention), a 1D CNN and an MLP (dropout called with
``deterministic``); `lrpjax.models.MiniVGG` is the reference CNN. `make(name)` builds one
with random weights and `example_input(name, n)` gives inputs it takes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.core.layers import MaxPool
from lrpjax.models import MiniVGG, TransformerBlock

__all__ = [
    "CNN1D",
    "MLP",
    "ZOO",
    "ResNet",
    "TextTransformer",
    "ViT",
    "example_input",
    "make",
]


class MLP(nnx.Module):
    """Dense -> ReLU -> Dropout -> Dense -> ReLU -> Dense on (N, features)."""

    def __init__(self, features: int = 8, hidden: int = 16, num_classes: int = 3, *, rngs):
        self.dense1 = nnx.Linear(features, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.dense2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.dropout(nnx.relu(self.dense1(x)), deterministic=not train)
        return self.head(nnx.relu(self.dense2(x)))


class CNN1D(nnx.Module):
    """Conv1D -> ReLU -> MaxPool -> Conv1D -> ReLU -> mean over time -> Dense on (N, T, C)."""

    def __init__(self, channels: int = 2, width: int = 8, num_classes: int = 3, *, rngs):
        self.conv1 = nnx.Conv(channels, width, (3,), padding="SAME", rngs=rngs)
        self.pool = MaxPool((2,))
        self.conv2 = nnx.Conv(width, width, (3,), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.pool(nnx.relu(self.conv1(x)))
        return self.head(jnp.mean(nnx.relu(self.conv2(x)), axis=1))


class ResBlock(nnx.Module):
    def __init__(self, width: int, *, rngs):
        self.conv1 = nnx.Conv(width, width, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(width, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        h = self.bn2(self.conv2(h), use_running_average=not train)
        return nnx.relu(x + h)


class ResNet(nnx.Module):
    """A CIFAR ResNet: stem Conv -> BN -> ReLU, residual blocks, global average pool, Dense."""

    def __init__(self, width: int = 8, blocks: int = 2, num_classes: int = 10, *, rngs):
        self.stem = nnx.Conv(3, width, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        for i in range(blocks):
            setattr(self, f"block{i}", ResBlock(width, rngs=rngs))
        self.blocks = blocks
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nnx.relu(self.bn(self.stem(x), use_running_average=not train))
        for i in range(self.blocks):
            x = getattr(self, f"block{i}")(x, train=train)
        return self.head(jnp.mean(x, axis=(1, 2)))


class _Transformer(nnx.Module):
    """Blocks ``block0``, ``block1``, ... (`lrpjax.models.TransformerBlock`: pre-norm
    attention and GELU MLP, as the shipped CCT's), a final LayerNorm and a dense head."""

    def _encoder(self, dim, depth, heads, mlp_dim, num_classes, use_bias, rngs) -> None:
        for i in range(depth):
            block = TransformerBlock(dim, heads, mlp_dim, 0.1, use_bias=use_bias, rngs=rngs)
            setattr(self, f"block{i}", block)
        self.depth = depth
        self.norm = nnx.LayerNorm(dim, use_bias=use_bias, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, use_bias=use_bias, rngs=rngs)

    def _encode(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for i in range(self.depth):
            x = getattr(self, f"block{i}")(x, mask=mask)
        return self.norm(x)


class ViT(_Transformer):
    """A compact vision transformer on (N, H, W, C) images: patch embedding (a strided
    convolution), class token, position embedding, pre-norm blocks, LayerNorm, Dense."""

    def __init__(
        self,
        *,
        image_size: int = 32,
        patch: int = 8,
        channels: int = 3,
        dim: int = 16,
        depth: int = 1,
        heads: int = 2,
        mlp_dim: int = 32,
        num_classes: int = 10,
        use_bias: bool = True,
        rngs,
    ):
        self.patch_embed = nnx.Conv(
            channels, dim, (patch, patch), strides=patch, padding="VALID", use_bias=use_bias,
            rngs=rngs,
        )  # fmt: skip
        tokens = (image_size // patch) ** 2 + 1
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dim)))
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, dim)))
        self._encoder(dim, depth, heads, mlp_dim, num_classes, use_bias, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.patch_embed(x)
        n, dim = x.shape[0], x.shape[-1]
        x = x.reshape(n, -1, dim)
        cls = jnp.broadcast_to(self.cls_token[...], (n, 1, dim))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        return self.head(self._encode(x)[:, 0])


class TextTransformer(_Transformer):
    """A causal text transformer on (N, T) int32 tokens: `nnx.Embed`, position embedding,
    pre-norm blocks with a causal mask, LayerNorm, mean over tokens, Dense."""

    def __init__(
        self,
        *,
        vocab: int = 50,
        length: int = 12,
        dim: int = 16,
        depth: int = 1,
        heads: int = 2,
        mlp_dim: int = 32,
        num_classes: int = 2,
        use_bias: bool = True,
        rngs,
    ):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, length, dim)))
        self._encoder(dim, depth, heads, mlp_dim, num_classes, use_bias, rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.pos_embed[...][:, : tokens.shape[1]]
        return self.head(jnp.mean(self._encode(x, mask=nnx.make_causal_mask(tokens)), axis=1))


#: name -> (constructor taking rngs, input shape of one example, input dtype)
ZOO: dict[str, tuple[Callable[..., nnx.Module], tuple[int, ...], str]] = {
    "minivgg": (lambda rngs: MiniVGG(rngs=rngs), (32, 32, 3), "float32"),
    "resnet": (lambda rngs: ResNet(rngs=rngs), (32, 32, 3), "float32"),
    "vit": (lambda rngs: ViT(rngs=rngs), (32, 32, 3), "float32"),
    "text_transformer": (lambda rngs: TextTransformer(rngs=rngs), (12,), "int32"),
    "cnn1d": (lambda rngs: CNN1D(rngs=rngs), (16, 2), "float32"),
    "mlp": (lambda rngs: MLP(rngs=rngs), (8,), "float32"),
}


def make(name: str, seed: int = 0) -> nnx.Module:
    """A zoo model with random weights, in eval mode.

    Raises:
      ValueError: for an unknown name, listing the zoo.
    """
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose from {', '.join(ZOO)}")
    model = ZOO[name][0](nnx.Rngs(seed))
    model.eval()
    return model


def example_input(name: str, n: int, seed: int = 0) -> np.ndarray:
    """(n, ...) inputs for a zoo model: images in [0, 1], series, features or tokens."""
    _, shape, dtype = ZOO[name]
    rng = np.random.default_rng(seed)
    if dtype == "int32":
        return rng.integers(0, 50, (n, *shape)).astype(np.int32)
    return rng.random((n, *shape), dtype=np.float32)
