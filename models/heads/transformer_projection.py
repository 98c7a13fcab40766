"""TransformerProjection: a small pre-norm transformer over a backbone's tokens -> one unit embedding.

SiameseCLIP's head (../shared/seeds/000_*.txt): on top of a frozen backbone,
    LayerNorm -> [Dense to `width`] -> [+ learned positions] -> N encoder blocks -> pooling
    -> LayerNorm -> Dense(embedding_dim) -> L2 normalisation (an `L2Normalize` layer after it)
Input: a token sequence (batch, T, C) — CLIP's class + patch tokens, a CNN's feature-map positions — or a
pooled vector (batch, C), read as a sequence of one token (the seed's form: attention over one token is
then two linear maps, and the blocks act as a residual MLP). Optional padding mask (batch, T), True = a
real token: padded tokens are never attended to, so what they hold cannot change the output.

Pooling: "cls" prepends a learned class token and reads it after the blocks (ViT, BERT); "attention"
pools the block outputs with one learned query through multi-head attention (Lee et al. 2019, "PMA").

`residual`: the head starts as the frozen embedding and learns a correction to it. A bias-free Dense with an
orthogonal initial kernel ("skip") maps the mean of the real tokens — for a CNN, exactly its global-average
pooled embedding, up to a positive factor — to embedding_dim, and the transformer branch's last projection
starts at zero; so before training the head's unit vectors have the frozen embedding's cosines exactly (an
orthogonal map keeps inner products when embedding_dim >= C), and training moves away from that space only as
far as the loss asks. On a few hundred training groups a head trained from scratch can lose the fine detail
the frozen space had (seed 000's near-duplicates); this keeps it (BENCHMARKS 15).
The blocks use keras.layers.MultiHeadAttention; they compute in the global dtype policy (float16 under
mixed precision) and the L2 normalisation after the head in float32.
"""
from __future__ import annotations

import keras
from keras import ops

from models.layers import L2Normalize

POOLINGS = ("cls", "attention")


def _key_dim(width: int, num_heads: int) -> int:
    # Each head gets width / heads channels (rounded up), as in the original transformer.
    return max(1, -(-width // num_heads))


def _key_mask(padding_mask, n_queries: int):
    """(batch, n_queries, T) bool attention mask from a (batch, T) padding mask: every query sees the real keys."""
    keys = ops.expand_dims(ops.cast(padding_mask, "bool"), 1)
    return ops.logical_and(keys, ops.ones((1, n_queries, 1), dtype="bool"))


def _mean_of_real(x, padding_mask):
    """(batch, C) mean of each item's real tokens (all of them without a mask)."""
    if padding_mask is None:
        return ops.mean(x, axis=1)
    weights = ops.expand_dims(ops.cast(padding_mask, x.dtype), -1)
    return ops.sum(x * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), ops.cast(1.0, x.dtype))


@keras.saving.register_keras_serializable(package="embedlab")
class TokenScale(keras.layers.Layer):
    """Each item's token sequence divided by its largest absolute value, as float16: the form phase 1 caches
    tokens in and the head reads them in (the extractor's "tokens" output ends in this layer).

    float16 keeps 11 significant bits relative to the largest value only above ~6e-5 (and flushes values
    below ~6e-8 to zero), while backbone activations range from ~1e-17 (a randomly initialised MobileNet) to
    ~1e2; one positive factor per item brings every item to a peak of 1 first. The head loses nothing by
    it: its first layer, a LayerNorm, takes each token's own scale out anyway. An all-zero item stays zero.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, tokens):
        tokens = ops.cast(tokens, "float32")
        peak = ops.max(ops.abs(tokens), axis=(1, 2), keepdims=True)
        return ops.cast(tokens / ops.maximum(peak, 1e-30), "float16")

    def compute_output_spec(self, tokens):
        return keras.KerasTensor(tokens.shape, dtype="float16")


@keras.saving.register_keras_serializable(package="embedlab")
class TransformerEncoderBlock(keras.layers.Layer):
    """Pre-norm encoder block: x + Attention(LN(x)), then x + MLP(LN(x)); MLP = Dense(r·C, gelu) -> Dense(C)."""

    def __init__(self, num_heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if num_heads < 1 or mlp_ratio <= 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"num_heads must be >= 1, mlp_ratio > 0 and dropout in [0, 1); got {num_heads}, "
                             f"{mlp_ratio}, {dropout}")
        self.num_heads, self.mlp_ratio, self.dropout = int(num_heads), float(mlp_ratio), float(dropout)

    def build(self, input_shape):
        width = int(input_shape[-1])
        policy = self.dtype_policy
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy, name="attention_norm")
        self.attention = keras.layers.MultiHeadAttention(self.num_heads, _key_dim(width, self.num_heads),
                                                         dropout=self.dropout, dtype=policy, name="attention")
        self.mlp_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy, name="mlp_norm")
        self.mlp_in = keras.layers.Dense(max(1, int(round(self.mlp_ratio * width))), activation="gelu", dtype=policy,
                                         name="mlp_in")
        self.mlp_out = keras.layers.Dense(width, dtype=policy, name="mlp_out")
        self.drop = keras.layers.Dropout(self.dropout, dtype=policy)
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.mlp_norm.build(input_shape)
        self.mlp_in.build(input_shape)
        self.mlp_out.build((*input_shape[:-1], self.mlp_in.units))
        super().build(input_shape)

    def call(self, x, attention_mask=None, training=None):
        h = self.attention_norm(x)
        h = self.attention(h, h, attention_mask=attention_mask, training=training)
        x = x + self.drop(h, training=training)
        h = self.mlp_out(self.drop(self.mlp_in(self.mlp_norm(x)), training=training))
        return x + self.drop(h, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
                "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="embedlab")
class TransformerProjection(keras.layers.Layer):
    """Tokens (batch, T, C) or a vector (batch, C) -> (batch, embedding_dim), before L2 normalisation.

    `width`: the blocks' width (0 = C, the tokens' own); `positional`: add a learned embedding per token
    position (T > 1 only; the sequence length is then fixed at build); `residual`: start from the frozen
    embedding (see the module docstring). Call with `padding_mask` (batch, T), True for real tokens, to
    leave padding out.
    """

    def __init__(self, embedding_dim: int = 512, num_layers: int = 2, num_heads: int = 8, mlp_ratio: float = 4.0,
                 dropout: float = 0.1, pooling: str = "cls", width: int = 0, positional: bool = True,
                 residual: bool = False, **kwargs):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        if embedding_dim < 1 or num_layers < 0 or num_heads < 1 or width < 0:
            raise ValueError(f"embedding_dim and num_heads must be >= 1, num_layers and width >= 0; got "
                             f"{embedding_dim}, {num_heads}, {num_layers}, {width}")
        self.embedding_dim, self.num_layers, self.num_heads = int(embedding_dim), int(num_layers), int(num_heads)
        self.mlp_ratio, self.dropout, self.pooling = float(mlp_ratio), float(dropout), pooling
        self.width, self.positional, self.residual = int(width), bool(positional), bool(residual)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        length = 1 if len(input_shape) == 2 else input_shape[1]
        width = self.width or channels
        policy = self.dtype_policy
        self.input_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy, name="input_norm")
        self.input_norm.build((None, length, channels))
        self.input_projection = None
        if width != channels:
            self.input_projection = keras.layers.Dense(width, dtype=policy, name="input_projection")
            self.input_projection.build((None, length, channels))
        self.positions = None
        if self.positional and length != 1:
            if length is None:
                raise ValueError("TransformerProjection with positional=True needs a known sequence length")
            self.positions = self.add_weight(shape=(int(length), width), name="positions",
                                             initializer=keras.initializers.TruncatedNormal(stddev=0.02))
        query = keras.initializers.TruncatedNormal(stddev=0.02)
        n_tokens = None if length is None else length + (self.pooling == "cls")
        if self.pooling == "cls":
            self.class_token = self.add_weight(shape=(1, 1, width), name="class_token", initializer=query)
        self.blocks = [TransformerEncoderBlock(self.num_heads, self.mlp_ratio, self.dropout, dtype=policy,
                                               name=f"block_{i}") for i in range(self.num_layers)]
        for block in self.blocks:
            block.build((None, n_tokens, width))
        if self.pooling == "attention":
            self.pool_query = self.add_weight(shape=(1, 1, width), name="pool_query", initializer=query)
            self.pool_attention = keras.layers.MultiHeadAttention(self.num_heads, _key_dim(width, self.num_heads),
                                                                  dtype=policy, name="pool_attention")
            self.pool_attention.build((None, 1, width), (None, n_tokens, width))
        self.output_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy, name="output_norm")
        self.output_norm.build((None, width))
        self.projection = keras.layers.Dense(self.embedding_dim, dtype=policy, name="projection",
                                             kernel_initializer="zeros" if self.residual else "glorot_uniform")
        self.projection.build((None, width))
        self.skip = None
        if self.residual:
            self.skip = keras.layers.Dense(self.embedding_dim, use_bias=False, dtype=policy, name="skip",
                                           kernel_initializer=keras.initializers.Orthogonal())
            self.skip.build((None, channels))
        super().build(input_shape)

    def call(self, tokens, padding_mask=None, training=None):
        x = ops.cast(tokens, self.compute_dtype)
        if len(x.shape) == 2:
            x = ops.expand_dims(x, 1)
            padding_mask = None   # one token: nothing to pad
        batch = ops.shape(x)[0]
        skipped = None if self.skip is None else self.skip(_mean_of_real(x, padding_mask))
        x = self.input_norm(x)
        if self.input_projection is not None:
            x = self.input_projection(x)
        if self.positions is not None:
            x = x + ops.cast(self.positions, x.dtype)
        if padding_mask is not None:
            padding_mask = ops.cast(padding_mask, "bool")
        if self.pooling == "cls":
            token = ops.broadcast_to(ops.cast(self.class_token, x.dtype), (batch, 1, x.shape[-1]))
            x = ops.concatenate([token, x], axis=1)
            if padding_mask is not None:
                padding_mask = ops.concatenate([ops.ones((batch, 1), dtype="bool"), padding_mask], axis=1)
        mask = None if padding_mask is None else _key_mask(padding_mask, x.shape[1] or ops.shape(x)[1])
        for block in self.blocks:
            x = block(x, attention_mask=mask, training=training)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            query = ops.broadcast_to(ops.cast(self.pool_query, x.dtype), (batch, 1, x.shape[-1]))
            pool_mask = None if padding_mask is None else _key_mask(padding_mask, 1)
            pooled = self.pool_attention(query, x, attention_mask=pool_mask, training=training)[:, 0]
        out = self.projection(self.output_norm(pooled))
        return out if skipped is None else out + skipped

    def compute_output_shape(self, tokens_shape, padding_mask_shape=None):
        return (tokens_shape[0], self.embedding_dim)

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio, "dropout": self.dropout,
                "pooling": self.pooling, "width": self.width, "positional": self.positional,
                "residual": self.residual}


def build_transformer_head(token_shape: tuple[int, ...], embedding_dim: int = 512, *, num_layers: int = 2,
                           num_heads: int = 8, pooling: str = "cls", dropout: float = 0.1, width: int = 0,
                           mlp_ratio: float = 4.0, padding_mask: bool = False, residual: bool = False,
                           name: str = "transformer_head") -> keras.Model:
    """Tokens (batch, *token_shape) -> unit vectors (batch, embedding_dim), float32 under any policy.

    `token_shape` is (T, C) for token sequences or (C,) for pooled features. The model's input is named
    "tokens" (plus "padding_mask" (batch, T) when `padding_mask`); its last layer is an `L2Normalize`.
    """
    tokens = keras.Input(shape=tuple(token_shape), name="tokens")
    inputs = [tokens]
    projection = TransformerProjection(embedding_dim, num_layers, num_heads, mlp_ratio, dropout, pooling, width,
                                       residual=residual, name="transformer_projection")
    if padding_mask:
        if len(token_shape) != 2:
            raise ValueError("a padding mask needs token sequences: token_shape (T, C)")
        mask = keras.Input(shape=(token_shape[0],), dtype="bool", name="padding_mask")
        inputs.append(mask)
        x = projection(tokens, padding_mask=mask)
    else:
        x = projection(tokens)
    outputs = L2Normalize(name="l2_normalize")(x)
    return keras.Model(inputs if padding_mask else tokens, outputs, name=name)
