"""scBERT: a Performer (FAVOR+ linear attention) over binned gene expression.

Reads top-down like the maths: configuration, random features, the FAVOR+ reference, attention,
feed-forward, residual wrappers, embeddings, encoder, the masked-expression head and the cell-type
head. How it is executed fast (chunked FAVOR+, fused layers, compiled steps, threads) lives in
kernels/; each encoder layer chooses in its own forward, from kernels' execution settings, between
that engine and its plain modules, which compute the same function.

Parameter and buffer names follow the published checkpoints (`panglao_pretrain.pth`) exactly, so their
`model_state_dict` loads with ``strict=True`` and ours load in the original code. Pure PyTorch: no file
I/O, no argparse, no environment reads, no global device.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import InitVar, asdict, dataclass, fields, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels

# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ModelConfig:
    """Every architecture number of the model; derived sizes are properties."""

    bin_num: int = 5  # expression bins 0..bin_num; token bin_num + 1 is [MASK] / ignore id
    gene_num: int = 16906  # genes in the panel; the sequence appends one always-zero position
    dim: int = 200  # model width (= the Gene2Vec width in the published model)
    depth: int = 6  # encoder layers
    heads: int = 10  # attention heads
    dim_head: int = 64  # width of one head; heads * dim_head may exceed dim (640 > 200 published)
    nb_features: int | None = None  # FAVOR+ random features per head; None -> int(dim_head ln dim_head)
    ff_mult: int = 4  # feed-forward hidden width = ff_mult * dim
    emb_dropout: float = 0.0  # dropout after the embeddings (0 as published)
    attn_dropout: float = 0.0  # dropout on the attention output (0 as published)
    ff_dropout: float = 0.0  # dropout inside the feed-forward (0 as published)
    residual: str = "prenorm"  # "prenorm": x + F(LN(x)) as published; "rezero": x + g * F(x)
    pos_embed: str = "gene2vec"  # "gene2vec" (frozen float64 table), "learned" or "none"
    feature_redraw_interval: int = 1000  # training forwards between redraws of the random features
    # Deprecated, for one release: how to execute is not architecture (kernels.ExecutionSettings).
    # Given here, they apply to the models built from this config and are not stored in checkpoints.
    attention: InitVar[str | None] = None  # "fast" -> path "fused", "reference" -> path "reference"
    attn_chunk: InitVar[int | None] = None  # -> chunk
    grad_checkpoint: InitVar[bool | None] = None  # -> grad_checkpoint

    def __post_init__(self, attention: str | None, attn_chunk: int | None, grad_checkpoint: bool | None) -> None:
        if self.nb_features is None:
            self.nb_features = int(self.dim_head * math.log(self.dim_head))
        if self.residual not in ("prenorm", "rezero"):
            raise ValueError(f"residual must be 'prenorm' or 'rezero', got {self.residual!r}")
        if self.pos_embed not in ("gene2vec", "learned", "none"):
            raise ValueError(f"pos_embed must be 'gene2vec', 'learned' or 'none', got {self.pos_embed!r}")
        if attention not in (None, "fast", "reference"):
            raise ValueError(f"attention must be 'fast' or 'reference', got {attention!r}")
        given = {"path": {"fast": "fused", "reference": "reference"}.get(attention), "chunk": attn_chunk,
                 "grad_checkpoint": grad_checkpoint}
        self.execution_overrides = {k: v for k, v in given.items() if v is not None}
        if self.execution_overrides:
            warnings.warn("ModelConfig's attention, attn_chunk and grad_checkpoint are deprecated: they are "
                          "execution settings now (kernels.set_execution / kernels.execution: path, chunk, "
                          "grad_checkpoint)", DeprecationWarning, stacklevel=3)

    @property
    def num_tokens(self) -> int:
        return self.bin_num + 2

    @property
    def mask_token_id(self) -> int:
        return self.bin_num + 1

    @property
    def seq_len(self) -> int:
        return self.gene_num + 1

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Ignores keys it does not know: older checkpoints also stored attention, attn_chunk and
        grad_checkpoint, which are execution settings now."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


PRESETS: dict[str, ModelConfig] = {
    # the published shape (Yang et al. 2022)
    "scbert": ModelConfig(),
    # CPU-sized: minutes on a laptop for a few thousand cells of a few thousand genes
    "small": ModelConfig(dim=64, depth=2, heads=4, dim_head=32, nb_features=110),
    # for tests and smoke runs
    "tiny": ModelConfig(dim=16, depth=2, heads=2, dim_head=8, nb_features=16),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with fields overridden (e.g. ``gene_num`` from the data's panel)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def set_fast_compile(mode: str) -> None:
    """Deprecated, for one release: ``kernels.set_execution(compile=mode)``."""
    warnings.warn("model.set_fast_compile is deprecated; use kernels.set_execution(compile=...)", DeprecationWarning,
                  stacklevel=2)
    kernels.set_execution(compile=mode)


# --------------------------------------------------------------------------------------------------
# random features


def orthogonal_gaussian_matrix(
    nb_rows: int, nb_columns: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(nb_rows, nb_columns) matrix of stacked orthogonal blocks, each row rescaled by the norm of an
    independent Gaussian vector, so rows are marginally Gaussian but mutually orthogonal per block."""
    blocks = []
    for _ in range(math.ceil(nb_rows / nb_columns)):
        gaussian = torch.randn(nb_columns, nb_columns, generator=generator)
        q, _ = torch.linalg.qr(gaussian, mode="reduced")
        blocks.append(q.t())
    matrix = torch.cat(blocks)[:nb_rows]
    row_norms = torch.randn(nb_rows, nb_columns, generator=generator).norm(dim=1)
    return row_norms[:, None] * matrix


# --------------------------------------------------------------------------------------------------
# FAVOR+ kernels

KERNEL_EPS = 1e-4  # added to every feature, as published


def softmax_features_reference(x: torch.Tensor, projection: torch.Tensor, is_query: bool) -> torch.Tensor:
    """Positive random features phi(x) of the softmax kernel, written as in REFERENCE.md §3.

    x: (b, h, n, d); projection: (m, d). Queries are stabilised per row; keys by one number per cell,
    the maximum of the projections over that cell's heads, positions and features (the published code
    took it over the whole batch, which made a cell's output depend on its neighbours)."""
    d, m = x.shape[-1], projection.shape[0]
    c = d**-0.25
    ratio = m**-0.5
    proj = torch.einsum("bhnd,md->bhnm", c * x, projection.to(x.dtype))  # (b, h, n, m)
    diag = (x**2).sum(dim=-1, keepdim=True) * (c * c / 2.0)  # (b, h, n, 1)
    if is_query:
        stabiliser = proj.amax(dim=-1, keepdim=True)
    else:
        stabiliser = proj.amax(dim=(1, 2, 3), keepdim=True)
    return ratio * (torch.exp(proj - diag - stabiliser) + KERNEL_EPS)


def linear_attention_reference(q_feat: torch.Tensor, k_feat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention D^-1 phi(Q) (phi(K)^T V); all (b, h, n, .)."""
    k_sum = k_feat.sum(dim=-2)  # (b, h, m)
    normaliser = 1.0 / torch.einsum("bhnm,bhm->bhn", q_feat, k_sum)
    context = torch.einsum("bhnm,bhne->bhme", k_feat, v)  # (b, h, m, e)
    return torch.einsum("bhme,bhnm,bhn->bhne", context, q_feat, normaliser)


def favor_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """q, k, v: (b, n, h, d) -> (b, n, h, d), materialising the (b, h, n, m) feature maps."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, n, d)
    q_feat = softmax_features_reference(q, projection, is_query=True)
    k_feat = softmax_features_reference(k, projection, is_query=False)
    return linear_attention_reference(q_feat, k_feat, v).transpose(1, 2)

# --------------------------------------------------------------------------------------------------
# attention


class FastAttention(nn.Module):
    """FAVOR+ with the positive softmax kernel; holds the (nb_features, dim_head) random projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.nb_features = config.nb_features
        self.dim_head = config.dim_head
        self.register_buffer("projection_matrix", orthogonal_gaussian_matrix(config.nb_features, config.dim_head))

    @torch.no_grad()
    def redraw_projection_matrix(self, generator: torch.Generator) -> None:
        fresh = orthogonal_gaussian_matrix(self.nb_features, self.dim_head, generator=generator)
        self.projection_matrix.copy_(fresh)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if kernels.get_execution().path == "reference":
            return favor_attention_reference(q, k, v, self.projection_matrix)
        return kernels.favor_attention(q, k, v, self.projection_matrix)  # the same function, chunked


class SelfAttention(nn.Module):
    """Multi-head FAVOR+ self-attention: dim -> heads * dim_head (no bias) -> dim (with bias)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads = config.heads
        self.fast_attention = FastAttention(config)
        self.to_q = nn.Linear(config.dim, config.inner_dim, bias=False)
        self.to_k = nn.Linear(config.dim, config.inner_dim, bias=False)
        self.to_v = nn.Linear(config.dim, config.inner_dim, bias=False)
        self.to_out = nn.Linear(config.inner_dim, config.dim)
        self.dropout = nn.Dropout(config.attn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # one matmul for q, k and v; the three weights stay separate parameters for checkpoint names
        qkv_weight = torch.cat((self.to_q.weight, self.to_k.weight, self.to_v.weight))
        qkv = F.linear(x, qkv_weight).view(b, n, 3, self.heads, -1)  # (b, n, 3, h, d)
        out = self.fast_attention(*qkv.unbind(dim=2))  # (b, n, h, d)
        return self.dropout(self.to_out(out.reshape(b, n, -1)))


# --------------------------------------------------------------------------------------------------
# feed-forward and residual wrappers


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.dim * config.ff_mult)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(config.ff_dropout)
        self.w2 = nn.Linear(config.dim * config.ff_mult, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.dropout(self.act(self.w1(x))))


class SequenceChunks(nn.Module):
    """Applies a position-wise module to slices of the sequence (the execution settings' chunk),
    bounding the wide hidden activation in inference. (The published model wraps its feed-forward
    the same way, hence the `fn.fn` names.)"""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = kernels.sequence_chunk(x)
        if torch.is_grad_enabled() or x.shape[1] <= chunk:
            return self.fn(x)
        return torch.cat([self.fn(part) for part in x.split(chunk, dim=1)], dim=1)


class PreLayerNorm(nn.Module):
    """F(LN(x)); the residual sum is added by the encoder."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class ReZero(nn.Module):
    """g * F(x) with a learned scalar g starting near 0, so each block starts as the identity."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(1e-3))
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) * self.g


# --------------------------------------------------------------------------------------------------
# embeddings


class GenePositionalEmbedding(nn.Module):
    """One vector per panel position. "gene2vec": a frozen float64 table (published layout: the last,
    appended position is all zeros), cast to the activation dtype when added; "learned": trainable."""

    def __init__(self, config: ModelConfig, table: torch.Tensor | None = None):
        super().__init__()
        frozen = config.pos_embed == "gene2vec"
        self.emb = nn.Embedding(config.seq_len, config.dim, dtype=torch.float64 if frozen else None)
        if frozen:
            self.emb.weight.requires_grad_(False)
            with torch.no_grad():
                if table is None:
                    self.emb.weight.zero_()  # filled by a checkpoint or a Gene2Vec table
                else:
                    if tuple(table.shape) != (config.seq_len, config.dim):
                        raise ValueError(
                            f"Gene2Vec table has shape {tuple(table.shape)}; the model needs "
                            f"({config.seq_len}, {config.dim}) (genes + 1 appended row, model width)"
                        )
                    self.emb.weight.copy_(table.to(torch.float64))

    def forward(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return self.emb.weight[:n].to(dtype)  # (n, dim)


# --------------------------------------------------------------------------------------------------
# encoder


class EncoderLayer(nn.ModuleList):
    """[attention, feed-forward], each in its residual wrapper, as children 0 and 1 (the published
    state-dict paths `...layers.{i}.0.fn.to_q`, `...layers.{i}.1.fn.fn.w1`). Its forward is
    x + Attn(x), then + FF(.); a prenorm layer runs as one fused engine op when the settings allow."""

    def __init__(self, config: ModelConfig):
        def wrap(fn: nn.Module) -> nn.Module:
            return PreLayerNorm(config.dim, fn) if config.residual == "prenorm" else ReZero(fn)

        super().__init__([wrap(SelfAttention(config)), wrap(SequenceChunks(FeedForward(config)))])

    def fusable(self) -> bool:
        """The engine's fused layer computes prenorm layers with exact GELU, without dropout in training."""
        attn, ff = self
        if not (isinstance(attn, PreLayerNorm) and isinstance(ff, PreLayerNorm)):
            return False
        act = ff.fn.fn.act
        if not isinstance(act, nn.GELU) or act.approximate != "none":
            return False
        return not self.training or (attn.fn.dropout.p == 0 and ff.fn.fn.dropout.p == 0)

    def engine_weights(self) -> kernels.LayerWeights:
        attn, ff = self
        sa, fw = attn.fn, ff.fn.fn
        return kernels.LayerWeights(attn.norm.weight, attn.norm.bias, sa.to_q.weight, sa.to_k.weight, sa.to_v.weight,
                                    sa.to_out.weight, sa.to_out.bias, ff.norm.weight, ff.norm.bias, fw.w1.weight,
                                    fw.w1.bias, fw.w2.weight, fw.w2.bias, sa.fast_attention.projection_matrix,
                                    attn.norm.eps, ff.norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        settings = kernels.get_execution()
        if settings.path == "fused" and self.fusable() and kernels.fuses_layers(x):
            return kernels.fused_layer(x, self.engine_weights())  # recomputes what it does not keep by itself
        if settings.grad_checkpoint and self.training and torch.is_grad_enabled():
            # the recomputation in backward runs with the settings of this forward
            return checkpoint(self._modules_forward, x, settings, use_reentrant=False)
        return self._modules_forward(x)

    def _modules_forward(self, x: torch.Tensor, settings: kernels.ExecutionSettings | None = None) -> torch.Tensor:
        attn, ff = self
        with kernels.execution(settings) if settings is not None else contextlib.nullcontext():
            x = x + attn(x)
            return x + ff(x)


class Layers(nn.Module):
    """Holds `layers` (one EncoderLayer per depth) under the published names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.depth))


class Performer(nn.Module):
    """The encoder: residual attention and feed-forward blocks, with the published redraw counter."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.net = Layers(config)
        self.feature_redraw_interval = config.feature_redraw_interval
        self.execution_overrides = dict(config.execution_overrides)  # deprecated config keywords
        # The published counter is a buffer (checkpoints carry it); forwards count in a Python int and
        # write it to the buffer, since reading a tensor would stall a GPU at every step.
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))
        self.calls = 0
        self.register_load_state_dict_post_hook(lambda module, _: module.read_counter())
        # Redraws use their own generator seeded from (redraw_seed, redraw_count), so every DDP rank
        # draws the same matrices without communicating, and a resumed run continues the sequence.
        self.redraw_seed = 0
        self.redraw_count = 0

    def read_counter(self) -> None:
        self.calls = int(self.calls_since_last_redraw)

    def redraw_projections(self) -> None:
        generator = torch.Generator().manual_seed(self.redraw_seed * 1_000_003 + self.redraw_count)
        for module in self.modules():
            if isinstance(module, FastAttention):
                module.redraw_projection_matrix(generator)
        self.redraw_count += 1

    def check_redraw(self) -> None:
        """Published semantics: at the start of a training forward, redraw if the counter has reached
        the interval (and reset it, without counting this call), otherwise count the call."""
        if not self.training or not self.feature_redraw_interval:
            return
        if self.calls >= self.feature_redraw_interval:
            self.redraw_projections()
            self.calls = 0
        else:
            self.calls += 1
        self.calls_since_last_redraw.fill_(self.calls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_redraw()
        deprecated = self.execution_overrides
        with kernels.execution(**deprecated) if deprecated else contextlib.nullcontext():
            for layer in self.net.layers:
                x = layer(x)
        return x


# --------------------------------------------------------------------------------------------------
# heads and the full model


class CellTypeHead(nn.Module):
    """The published classifier: a shared dim -> 1 projection per position (a Conv2d(1, 1, (1, dim))
    in the original, kept for the checkpoint layout), ReLU, then seq_len -> 512 -> 128 -> classes."""

    def __init__(self, seq_len: int, dim: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, dim))
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(seq_len, 512)
        self.act1 = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(512, 128)
        self.act2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(128, n_classes)

    @property
    def n_classes(self) -> int:
        return self.fc3.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, dim) encodings -> (b, 128) cell embedding before the last layer."""
        # the (1, dim) convolution is a dot product per position: a linear map is the same and faster
        score = F.linear(x, self.conv1.weight.view(1, -1).to(x.dtype), self.conv1.bias.to(x.dtype))
        hidden = self.act(score.squeeze(-1))  # (b, n)
        hidden = self.dropout1(self.act1(self.fc1(hidden)))
        return self.dropout2(self.act2(self.fc2(hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.features(x))


class PerformerLM(nn.Module):
    """Token + gene positional embedding -> Performer encoder -> final LayerNorm -> head (`to_out`):
    per-position expression-bin logits (pretraining) or, after `attach_classifier`, cell-type logits."""

    def __init__(self, config: ModelConfig, pos_table: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.pos_emb = GenePositionalEmbedding(config, pos_table) if config.pos_embed != "none" else None
        self.dropout = nn.Dropout(config.emb_dropout)
        self.performer = Performer(config)
        self.norm = nn.LayerNorm(config.dim)
        self.to_out: nn.Module = nn.Linear(config.dim, config.num_tokens)

    @property
    def head_kind(self) -> str:
        return "classifier" if isinstance(self.to_out, CellTypeHead) else "mlm"

    def attach_classifier(self, n_classes: int, dropout: float = 0.0) -> "PerformerLM":
        device = self.token_emb.weight.device
        self.to_out = CellTypeHead(self.config.seq_len, self.config.dim, n_classes, dropout).to(device)
        return self

    def set_redraw_seed(self, seed: int) -> None:
        self.performer.redraw_seed = int(seed)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, n) int tokens -> (b, n, dim) encodings after the final LayerNorm."""
        x = self.token_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(tokens.shape[1], x.dtype)
        x = self.performer(self.dropout(x))
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, return_encodings: bool = False) -> torch.Tensor:
        x = self.encode(tokens)
        if return_encodings:
            return x
        return self.to_out(x)

    def classify(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell-type logits (b, n_classes) and the 128-d cell embedding the head computes on the way."""
        if not isinstance(self.to_out, CellTypeHead):
            raise RuntimeError("classify() needs the classifier head: call attach_classifier first")
        hidden = self.to_out.features(self.encode(tokens))
        return self.to_out.fc3(hidden), hidden


# --------------------------------------------------------------------------------------------------
# reading an architecture back from a state dict


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> tuple[ModelConfig, str, int | None]:
    """Rebuilds the configuration of a checkpoint that carries none (the published files) from its
    tensor shapes. Returns (config, head kind "mlm" | "classifier", n_classes or None).

    Raises KeyError/ValueError when the keys do not form a scBERT model."""
    token_emb = state_dict["token_emb.weight"]
    num_tokens, dim = token_emb.shape
    depth = 1 + max(int(key.split(".")[3]) for key in state_dict if key.startswith("performer.net.layers."))
    prefix = "performer.net.layers.0.0."
    nb_features, dim_head = state_dict[prefix + "fn.fast_attention.projection_matrix"].shape
    inner = state_dict[prefix + "fn.to_q.weight"].shape[0]
    ff_hidden = state_dict["performer.net.layers.0.1.fn.fn.w1.weight"].shape[0]
    residual = "rezero" if prefix + "g" in state_dict else "prenorm"
    if "pos_emb.emb.weight" in state_dict:
        pos = state_dict["pos_emb.emb.weight"]
        seq_len = pos.shape[0]
        pos_embed = "gene2vec" if pos.dtype == torch.float64 else "learned"
    else:
        pos_embed = "none"
        seq_len = None
    if "to_out.fc1.weight" in state_dict:
        head = "classifier"
        n_classes = int(state_dict["to_out.fc3.weight"].shape[0])
        seq_len = int(state_dict["to_out.fc1.weight"].shape[1])
    elif "to_out.weight" in state_dict:
        head, n_classes = "mlm", None
    else:
        raise KeyError("to_out")
    if seq_len is None:
        raise ValueError("the sequence length cannot be read from a model with neither a positional "
                         "embedding nor a classifier head")
    if inner % dim_head or ff_hidden % dim:
        raise ValueError(f"inconsistent shapes: q width {inner}, head width {dim_head}, ff {ff_hidden}")
    config = ModelConfig(
        bin_num=int(num_tokens) - 2,
        gene_num=int(seq_len) - 1,
        dim=int(dim),
        depth=depth,
        heads=int(inner // dim_head),
        dim_head=int(dim_head),
        nb_features=int(nb_features),
        ff_mult=int(ff_hidden // dim),
        residual=residual,
        pos_embed=pos_embed,
    )
    return config, head, n_classes
