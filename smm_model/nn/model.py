"""The subspace multimodal (SMM) model and the paper's baselines, behind one factory.

SMM (method.md Part B, section 3): two subspaces, tumour and microenvironment. Each has its own SNN
gene encoder and its own branch that conditions the slide's patch tokens on that gene embedding and
runs gene-guided deformable cross-attention over them. The two subspace vectors are concatenated
and read by one head per task; each head's weight is split into its tumour and microenvironment
halves, which is where gradient coordination acts.

Baselines (same batch, same heads, same losses): ``snn`` (genomics only), ``abmil`` (histology
only, gated attention MIL) and ``concat`` (ABMIL + SNN late fusion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from smm_model.nn.attention import GeneDeformableAttention
from smm_model.nn.batch import Batch
from smm_model.config import ModelConfig
from smm_model.nn.layers import SNN, GatedAttentionPool, SplitHead, masked_mean
from smm_model.nn.layout import seed_tokens, spatial_tokens

__all__ = ["ModelOutput", "SubspaceBranch", "SMMModel", "SNNModel", "ABMILModel", "ConcatModel",
           "build_model", "count_parameters"]


@dataclass
class ModelOutput:
    """What every model returns.

    logits      task -> (B, C) raw logits (classification) or discrete-time hazard logits (survival)
    subspaces   the two (B, H) halves the split heads read (SMM only), for gradient coordination
    genes       the two (B, H) gene embeddings (SMM only), for the consistency loss
    grids       the two (B, g, 2*K*K) sampled key positions (SMM only), for the consistency loss
    """

    logits: dict[str, Tensor]
    subspaces: tuple[Tensor, Tensor] | None = None
    genes: tuple[Tensor, Tensor] | None = None
    grids: tuple[Tensor, Tensor] | None = None


class QueryFusion(nn.Module):
    """Gene-conditioned query tokens: ``W_p path + W_g gene`` with the gene vector broadcast.

    Equal to the reference's Linear over [path, gene repeated N times] with W = [W_p | W_g], but
    without materialising the (B, N, 2H) repeat. ``gene=False`` (the ``model.gene_queries: false``
    ablation) drops the gene term: the queries, and so the offsets, then see the patches only.
    """

    def __init__(self, dim: int, gene: bool = True) -> None:
        super().__init__()
        self.path = nn.Linear(dim, dim)
        self.gene = nn.Linear(dim, dim, bias=False) if gene else None

    def forward(self, path: Tensor, gene: Tensor) -> Tensor:  # (B, T, H), (B, H) -> (B, T, H)
        if self.gene is None:
            return self.path(path)
        return self.path(path) + self.gene(gene).unsqueeze(1)


class SubspaceBranch(nn.Module):
    """One subspace: patch projection, gene fusion, pre-norm deformable layer, pooling, projection.

    As in the reference, one LayerNorm serves the query and key streams and there is no
    feed-forward sub-layer; a final LayerNorm precedes the pooler.

    ``model.gene_queries: false`` (ablation: no gene conditioning of the queries) keeps the genes in
    the model but moves them from the queries to after pooling: the subspace vector is
    ``proj([pooled | gene])``. Without that the genes would not reach an SMM model at all (in the
    reference the subspace vector comes only from the branch), and the ablation would compare
    gene-guided attention with a histology-only model instead of with late gene fusion. The
    (2H -> H) ``proj`` has exactly the parameters the dropped ``W_g`` and the (H -> H) ``proj`` have
    together, so both variants are the same size.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H = cfg.hidden_dim
        self.grid = cfg.grid_size
        self.gene_queries = cfg.gene_queries
        self.path_fc = nn.Sequential(nn.Linear(cfg.feature_dim, H), nn.ReLU())
        self.fuse = QueryFusion(H, gene=cfg.gene_queries)
        self.norm = nn.LayerNorm(H)
        self.attn = GeneDeformableAttention(cfg)
        self.final_norm = nn.LayerNorm(H)
        self.pool = nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.proj = nn.Linear(H if cfg.gene_queries else 2 * H, H)

    def attention_inputs(self, tokens: Tensor, token_mask: Tensor | None, gene: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """What the deformable layer reads: the residual stream h (B, T, H), the query and key maps
        (B, H, G, G) and the key mask (B, G, G) or None. Shared by ``forward`` and the attention
        maps (``smm_model.nn.attention_maps``), so both see the same queries and keys."""
        B, T, _ = tokens.shape
        G = self.grid
        m = token_mask.unsqueeze(-1).to(tokens.dtype) if token_mask is not None else None
        path = self.path_fc(tokens)  # (B, T, H)
        if m is not None:
            path = path * m  # cells without tissue carry no features
        h = self.fuse(path, gene)  # (B, T, H) gene-conditioned queries
        xq, xkv = self.norm(h), self.norm(path)
        if m is not None:
            xq, xkv = xq * m, xkv * m
        to_map = lambda x: x.transpose(1, 2).reshape(B, -1, G, G)  # (B, T, H) -> (B, H, G, G)
        key_mask = token_mask.view(B, G, G) if token_mask is not None else None
        return h, to_map(xq), to_map(xkv), key_mask

    def forward(self, tokens: Tensor, token_mask: Tensor | None, gene: Tensor) -> tuple[Tensor, Tensor]:
        """(B, G*G, D) tokens, (B, G*G) mask or None, (B, H) gene -> (B, H) vector, (B, g, 2K^2) grid."""
        h, xq, xkv, key_mask = self.attention_inputs(tokens, token_mask, gene)
        a, grid = self.attn(xq, xkv, key_mask)  # (B, H, G, G), (B, g, 2K^2)
        h = h + a.flatten(2).transpose(1, 2)  # (B, T, H)
        pooled = self.pool(masked_mean(self.final_norm(h), token_mask))  # (B, H)
        if not self.gene_queries:
            pooled = torch.cat((pooled, gene), dim=1)  # (B, 2H) genes join after pooling
        return self.proj(pooled), grid


def _heads(cfg: ModelConfig, half: int, split: bool) -> nn.ModuleDict:
    make = (lambda c: SplitHead(half, c)) if split else (lambda c: nn.Linear(half, c))
    return nn.ModuleDict({t: make(c) for t, c in cfg.n_classes.items()})


class SMMModel(nn.Module):
    """The proposed model (``arch: smm``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_dim
        self.gene_tumour = SNN(cfg.genes_tumour, cfg.snn_hidden, H, cfg.dropout)
        self.gene_micro = SNN(cfg.genes_micro, cfg.snn_hidden, H, cfg.dropout)
        self.branch_tumour = SubspaceBranch(cfg)
        self.branch_micro = SubspaceBranch(cfg)
        self.heads = _heads(cfg, H, split=True)

    def tokens(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """The bag as a G x G token map, (B, G*G, D) and its mask (None: every token is tissue)."""
        if self.cfg.layout == "seed":
            return seed_tokens(batch.patches, batch.patch_mask, self.cfg.n_patches), None
        if batch.coords is None:
            raise ValueError("layout 'spatial' needs batch.coords (patch coordinates); got None")
        return spatial_tokens(batch.patches, batch.patch_mask, batch.coords, self.cfg.grid_size,
                              batch.patch_step)

    def forward(self, batch: Batch) -> ModelOutput:
        tokens, tmask = self.tokens(batch)
        g_t = self.gene_tumour(batch.genes_tumour)  # (B, H)
        g_e = self.gene_micro(batch.genes_micro)  # (B, H)
        v_t, grid_t = self.branch_tumour(tokens, tmask, g_t)
        v_e, grid_e = self.branch_micro(tokens, tmask, g_e)
        fused = torch.cat((v_t, v_e), dim=1)  # (B, 2H)
        logits = {t: head(fused) for t, head in self.heads.items()}
        return ModelOutput(logits, subspaces=(v_t, v_e), genes=(g_t, g_e), grids=(grid_t, grid_e))

    def split_heads(self) -> dict[str, SplitHead]:
        """The heads gradient coordination acts on."""
        return dict(self.heads.items())


class SNNModel(nn.Module):
    """Genomics only: one SNN over all genes (tumour then microenvironment)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.snn = SNN(cfg.genes_tumour + cfg.genes_micro, cfg.snn_hidden, cfg.hidden_dim, cfg.dropout)
        self.heads = _heads(cfg, cfg.hidden_dim, split=False)

    def forward(self, batch: Batch) -> ModelOutput:
        z = self.snn(torch.cat((batch.genes_tumour, batch.genes_micro), dim=1))  # (B, H)
        return ModelOutput({t: head(z) for t, head in self.heads.items()})

    def split_heads(self) -> dict[str, SplitHead]:
        return {}


class _ABMILEncoder(nn.Module):
    """Patch projection + gated attention pooling + a projection: (B, N, D) bag -> (B, H)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H = cfg.hidden_dim
        self.fc = nn.Sequential(nn.Linear(cfg.feature_dim, H), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.pool = GatedAttentionPool(H, cfg.abmil_hidden, cfg.dropout)
        self.rho = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Dropout(cfg.dropout))

    def attend(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(B, H) pooled bag and the (B, N) gated attention weights (padding 0)."""
        return self.pool(self.fc(batch.patches), batch.patch_mask)

    def forward(self, batch: Batch) -> Tensor:
        pooled, _ = self.attend(batch)  # (B, H)
        return self.rho(pooled)


class ABMILModel(nn.Module):
    """Histology only: gated attention MIL over the (padded, masked) bag."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = _ABMILEncoder(cfg)
        self.heads = _heads(cfg, cfg.hidden_dim, split=False)

    def forward(self, batch: Batch) -> ModelOutput:
        z = self.encoder(batch)
        return ModelOutput({t: head(z) for t, head in self.heads.items()})

    def split_heads(self) -> dict[str, SplitHead]:
        return {}


class ConcatModel(nn.Module):
    """Late fusion: [ABMIL histology vector | SNN gene vector] -> heads (the paper's Concat row)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = _ABMILEncoder(cfg)
        self.snn = SNN(cfg.genes_tumour + cfg.genes_micro, cfg.snn_hidden, cfg.hidden_dim, cfg.dropout)
        self.heads = _heads(cfg, 2 * cfg.hidden_dim, split=False)

    def forward(self, batch: Batch) -> ModelOutput:
        z = torch.cat((self.encoder(batch),
                       self.snn(torch.cat((batch.genes_tumour, batch.genes_micro), dim=1))), dim=1)
        return ModelOutput({t: head(z) for t, head in self.heads.items()})

    def split_heads(self) -> dict[str, SplitHead]:
        return {}


_ARCHS = {"smm": SMMModel, "snn": SNNModel, "abmil": ABMILModel, "concat": ConcatModel}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by ``cfg.arch``; all share the Batch -> ModelOutput interface."""
    return _ARCHS[cfg.arch](cfg)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
