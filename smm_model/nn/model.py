"""The subspace multimodal (SMM) model and the paper's baselines, behind one factory.

SMM (method.md Part B, section 3): two subspaces, tumour and microenvironment. Each has its own SNN
gene encoder and its own branch that conditions the slide's patch tokens on that gene embedding and
runs gene-guided deformable cross-attention over them. The two subspace vectors are concatenated
and read by one head per task; each head's weight is split into its tumour and microenvironment
halves, which is where gradient coordination acts.

Baselines (same batch, same heads, same losses): ``snn`` (genomics only), ``abmil`` (histology
only, gated attention MIL) and ``concat`` (ABMIL + SNN late fusion).

Patients without a modality (``Batch.has_patches`` / ``has_genes`` False; a site lacking it) train
only what their data reaches. SMM without slides: each subspace vector is read from one virtual
token, the gene-conditioned query of an empty patch, ``h = fuse(0, gene) = b_path + W_g gene``,
through the same final norm, pooler and projection, with no attention (there are no keys); the
patch projection, the pre-norm and the deformable attention get no gradient. SMM without genomics:
the gene embedding is zero, so the gene encoders and the fusion's gene path get none. Concat: the
missing half of the fused vector is zero. ``snn`` and ``abmil`` cannot run without the one modality
they read (a ValueError). ``trained_parameters`` names what a site holding some modalities trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from smm_model.nn.attention import GeneDeformableAttention
from smm_model.nn.batch import Batch
from smm_model.config import ModelConfig
from smm_model.contract.sites import ARCH_MODALITIES, MODALITIES
from smm_model.nn.layers import SNN, GatedAttentionPool, SplitHead, masked_mean
from smm_model.nn.layout import seed_tokens, spatial_tokens

__all__ = ["ModelOutput", "SubspaceBranch", "SurvivalLink", "SMMModel", "SNNModel", "ABMILModel", "ConcatModel",
           "build_model", "count_parameters", "trained_parameters"]


@dataclass
class ModelOutput:
    """What every model returns.

    logits      task -> (B, C) raw logits (classification) or discrete-time hazard logits (survival)
    subspaces   the two (B, H) halves the split heads read (SMM only), for gradient coordination
    genes       the two (B, H) gene embeddings (SMM only), for the consistency loss
    grids       the two (B, g, 2*K*K) sampled key positions (SMM only), for the consistency loss
    grid_rows   (B',) long: the batch rows the grids belong to, when only some patients have both
                modalities (the others sample no keys, so they have no grid); None: every row
    """

    logits: dict[str, Tensor]
    subspaces: tuple[Tensor, Tensor] | None = None
    genes: tuple[Tensor, Tensor] | None = None
    grids: tuple[Tensor, Tensor] | None = None
    grid_rows: Tensor | None = None


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

    def forward(self, path: Tensor, gene: Tensor | None) -> Tensor:  # (B, T, H), (B, H) -> (B, T, H)
        # gene None: no patient of the batch has genomics (a zero gene embedding, not computed)
        if self.gene is None or gene is None:
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

    def attention_inputs(self, tokens: Tensor, token_mask: Tensor | None, gene: Tensor | None
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

    def forward(self, tokens: Tensor | None, token_mask: Tensor | None, gene: Tensor | None,
                has_patches: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, G*G, D) tokens, (B, G*G) mask or None, (B, H) gene -> (B, H) vector, (B, g, 2K^2) grid.

        ``gene`` None: no row has genomics (a zero embedding, the gene path is not run).
        ``has_patches`` (B,) bool, None = every row has slides. Rows without get the virtual-token
        vector (final norm, pooler and projection of ``fuse(0, gene)``, module docstring) and no
        grid: the grid returned then holds the rows with slides only, in batch order (None when
        there are none; ``tokens`` may then be None)."""
        if has_patches is None:
            assert tokens is not None
            return self._attend(tokens, token_mask, gene)
        if gene is None:
            raise ValueError("SubspaceBranch: rows without slides need a gene embedding")
        with_p = has_patches.nonzero().squeeze(1)  # (B1,)
        without = (~has_patches).nonzero().squeeze(1)  # (B0,)
        g0 = gene[without]  # (B0, H)
        # The one virtual token of a patient without slides: an empty patch's gene-conditioned query.
        h0 = self.fuse.path.bias.expand(g0.shape[0], -1)  # (B0, H)
        if self.fuse.gene is not None:
            h0 = h0 + self.fuse.gene(g0)
        r0 = self._project(self.pool(self.final_norm(h0)), g0)  # (B0, H)
        v = r0.new_zeros(gene.shape[0], r0.shape[1]).index_copy(0, without, r0)  # (B, H)
        if with_p.numel() == 0:
            return v, None
        assert tokens is not None
        v1, grid = self._attend(tokens[with_p], None if token_mask is None else token_mask[with_p], gene[with_p])
        return v.index_copy(0, with_p, v1), grid  # (B, H), (B1, g, 2K^2)

    def _attend(self, tokens: Tensor, token_mask: Tensor | None, gene: Tensor | None) -> tuple[Tensor, Tensor]:
        """The branch over patch tokens (every row has slides): (B, H) vector, (B, g, 2K^2) grid."""
        h, xq, xkv, key_mask = self.attention_inputs(tokens, token_mask, gene)
        a, grid = self.attn(xq, xkv, key_mask)  # (B, H, G, G), (B, g, 2K^2)
        h = h + a.flatten(2).transpose(1, 2)  # (B, T, H)
        pooled = self.pool(masked_mean(self.final_norm(h), token_mask))  # (B, H)
        return self._project(pooled, gene), grid

    def _project(self, pooled: Tensor, gene: Tensor | None) -> Tensor:
        """(B, H) pooled vector -> (B, H) subspace vector; the gene_queries ablation joins the genes
        here (a zero vector for a batch without genomics)."""
        if not self.gene_queries:
            pooled = torch.cat((pooled, gene if gene is not None else torch.zeros_like(pooled)), dim=1)  # (B, 2H)
        return self.proj(pooled)


def _presence(batch: Batch) -> tuple[Tensor | None, Tensor | None]:
    """(has_patches, has_genes) of a batch, each (B,) bool or None when every patient has it; a
    patient with neither modality is an error (there is nothing to predict from)."""
    has_p, has_g = batch.present("histology"), batch.present("genomics")
    if has_p is not None and has_g is not None and bool((~has_p & ~has_g).any()):
        raise ValueError(f"batch: {int((~has_p & ~has_g).sum())} patient(s) have neither slides nor genomics")
    return has_p, has_g


def _encode_present(encode, present: Tensor | None, size: int, dim: int, like: Tensor) -> Tensor:
    """``encode()`` (B, dim) with zero rows for the patients lacking its input; not run at all when
    none has it (so its parameters get no gradient, not a zero one)."""
    if present is None:
        return encode()
    if not bool(present.any()):
        return like.new_zeros(size, dim)
    return torch.where(present.unsqueeze(1), encode(), 0.0)  # (B, dim)


def _require(batch: Batch, modality: str, arch: str) -> None:
    """A single-modality baseline reads one modality; every patient must have it."""
    flags = batch.present(modality)
    if flags is not None:
        raise ValueError(f"arch {arch!r} reads {modality} only, but {int((~flags).sum())} of the batch's "
                         f"{batch.size} patient(s) have none (a site without {modality} cannot train this arch)")


def _heads(cfg: ModelConfig, half: int, split: bool) -> nn.ModuleDict:
    make = (lambda c: SplitHead(half, c)) if split else (lambda c: nn.Linear(half, c))
    return nn.ModuleDict({t: make(c) for t, c in cfg.n_classes.items()})


class SurvivalLink(nn.Module):
    """Survival hazard logits that also read the model's own class predictions
    (``model.survival_reads_tasks``): ``h = head(z) + W [softmax(diagnosis) | softmax(grade)]``.

    Why: in the synthetic cohorts the risk follows diagnosis and grade, yet a survival head trained
    on a few hundred censored times does not find that direction in the fused vector although the
    classification heads, trained on clean labels, already point along it (benchmarks/README.md,
    survival-head diagnostic). Reading the class probabilities leaves the survival labels only a
    (sum of classes) x bins map to learn. The probabilities are detached: survival never bends the
    classification heads. W and its bias start at zero, so an untrained link is the plain head.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n = cfg.n_classes
        self.reads = tuple(t for t in cfg.tasks if t != "survival")
        self.link = nn.Linear(sum(n[t] for t in self.reads), n["survival"])
        nn.init.zeros_(self.link.weight)
        nn.init.zeros_(self.link.bias)

    def forward(self, logits: dict[str, Tensor]) -> dict[str, Tensor]:
        probs = torch.cat([torch.softmax(logits[t].detach(), dim=1) for t in self.reads], dim=1)  # (B, sum C)
        return {**logits, "survival": logits["survival"] + self.link(probs)}  # (B, bins)


def _task_logits(heads: nn.ModuleDict, link: SurvivalLink | None, z: Tensor) -> dict[str, Tensor]:
    """Every task head on the fused vector z (B, F); survival through ``link`` when there is one."""
    logits = {t: head(z) for t, head in heads.items()}
    return link(logits) if link is not None else logits


def _survival_link(cfg: ModelConfig) -> SurvivalLink | None:
    return SurvivalLink(cfg) if cfg.survival_reads_tasks else None


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
        self.survival_link = _survival_link(cfg)

    def tokens(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """The bag as a G x G token map, (B, G*G, D) and its mask (None: every token is tissue)."""
        if self.cfg.layout == "seed":
            return seed_tokens(batch.patches, batch.patch_mask, self.cfg.n_patches), None
        if batch.coords is None:
            raise ValueError("layout 'spatial' needs batch.coords (patch coordinates); got None")
        return spatial_tokens(batch.patches, batch.patch_mask, batch.coords, self.cfg.grid_size,
                              batch.patch_step)

    def forward(self, batch: Batch) -> ModelOutput:
        has_p, has_g = _presence(batch)
        if has_p is None and has_g is None:  # every patient has both modalities: the method as written
            tokens, tmask = self.tokens(batch)
            g_t = self.gene_tumour(batch.genes_tumour)  # (B, H)
            g_e = self.gene_micro(batch.genes_micro)  # (B, H)
            v_t, grid_t = self.branch_tumour(tokens, tmask, g_t)
            v_e, grid_e = self.branch_micro(tokens, tmask, g_e)
            fused = torch.cat((v_t, v_e), dim=1)  # (B, 2H)
            logits = _task_logits(self.heads, self.survival_link, fused)
            return ModelOutput(logits, subspaces=(v_t, v_e), genes=(g_t, g_e), grids=(grid_t, grid_e))
        H = self.cfg.hidden_dim
        tokens, tmask = self.tokens(batch) if has_p is None or bool(has_p.any()) else (None, None)
        g_t = _encode_present(lambda: self.gene_tumour(batch.genes_tumour), has_g, batch.size, H, batch.genes_tumour)
        g_e = _encode_present(lambda: self.gene_micro(batch.genes_micro), has_g, batch.size, H, batch.genes_micro)
        no_genes = has_g is not None and not bool(has_g.any())  # the fusion's gene path is then not run
        v_t, grid_t = self.branch_tumour(tokens, tmask, None if no_genes else g_t, has_p)
        v_e, grid_e = self.branch_micro(tokens, tmask, None if no_genes else g_e, has_p)
        fused = torch.cat((v_t, v_e), dim=1)  # (B, 2H)
        logits = _task_logits(self.heads, self.survival_link, fused)
        # The consistency loss compares genes with sampled key positions: rows holding both.
        both = torch.ones(batch.size, dtype=torch.bool, device=fused.device)
        for flags in (has_p, has_g):
            if flags is not None:
                both = both & flags
        rows = both.nonzero().squeeze(1)  # (B2,)
        grids = None
        if grid_t is not None and grid_e is not None and rows.numel() > 0:
            # grids hold the rows with slides (in batch order); keep those that also have genes
            keep = both[has_p].nonzero().squeeze(1) if has_p is not None else rows
            grids = (grid_t[keep], grid_e[keep])
        return ModelOutput(logits, subspaces=(v_t, v_e), genes=(g_t, g_e), grids=grids,
                           grid_rows=rows if grids is not None else None)

    def split_heads(self) -> dict[str, SplitHead]:
        """The heads gradient coordination acts on."""
        return dict(self.heads.items())

    #: The modalities the model reads (a site needs at least one of them).
    reads_modalities = ARCH_MODALITIES["smm"]

    def modality_parameters(self) -> dict[str, tuple[str, ...]]:
        """Per modality, the parameter prefixes only that modality's data reaches (SubspaceBranch
        and the module docstring): without slides no patch projection, pre-norm, attention or
        patch weight of the fusion; without genomics no gene encoder or gene weight of the fusion."""
        branches = ("branch_tumour", "branch_micro")
        patch_only = ("path_fc", "norm", "attn", "fuse.path.weight")
        return {"histology": tuple(f"{b}.{m}" for b in branches for m in patch_only),
                "genomics": ("gene_tumour", "gene_micro", *(f"{b}.fuse.gene" for b in branches))}


class SNNModel(nn.Module):
    """Genomics only: one SNN over all genes (tumour then microenvironment)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.snn = SNN(cfg.genes_tumour + cfg.genes_micro, cfg.snn_hidden, cfg.hidden_dim, cfg.dropout)
        self.heads = _heads(cfg, cfg.hidden_dim, split=False)
        self.survival_link = _survival_link(cfg)

    reads_modalities = ARCH_MODALITIES["snn"]

    def forward(self, batch: Batch) -> ModelOutput:
        _require(batch, "genomics", "snn")
        z = self.snn(torch.cat((batch.genes_tumour, batch.genes_micro), dim=1))  # (B, H)
        return ModelOutput(_task_logits(self.heads, self.survival_link, z))

    def split_heads(self) -> dict[str, SplitHead]:
        return {}

    def modality_parameters(self) -> dict[str, tuple[str, ...]]:
        return {"histology": (), "genomics": ("snn",)}


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
        self.survival_link = _survival_link(cfg)

    reads_modalities = ARCH_MODALITIES["abmil"]

    def forward(self, batch: Batch) -> ModelOutput:
        _require(batch, "histology", "abmil")
        z = self.encoder(batch)
        return ModelOutput(_task_logits(self.heads, self.survival_link, z))

    def split_heads(self) -> dict[str, SplitHead]:
        return {}

    def modality_parameters(self) -> dict[str, tuple[str, ...]]:
        return {"histology": ("encoder",), "genomics": ()}


class ConcatModel(nn.Module):
    """Late fusion: [ABMIL histology vector | SNN gene vector] -> heads (the paper's Concat row)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = _ABMILEncoder(cfg)
        self.snn = SNN(cfg.genes_tumour + cfg.genes_micro, cfg.snn_hidden, cfg.hidden_dim, cfg.dropout)
        self.heads = _heads(cfg, 2 * cfg.hidden_dim, split=False)
        self.survival_link = _survival_link(cfg)
        self.hidden = cfg.hidden_dim

    reads_modalities = ARCH_MODALITIES["concat"]

    def forward(self, batch: Batch) -> ModelOutput:
        has_p, has_g = _presence(batch)
        z = torch.cat((_encode_present(lambda: self.encoder(batch), has_p, batch.size, self.hidden, batch.patches),
                       _encode_present(lambda: self.snn(torch.cat((batch.genes_tumour, batch.genes_micro), dim=1)),
                                       has_g, batch.size, self.hidden, batch.genes_tumour)), dim=1)  # (B, 2H)
        return ModelOutput(_task_logits(self.heads, self.survival_link, z))

    def split_heads(self) -> dict[str, SplitHead]:
        return {}

    def modality_parameters(self) -> dict[str, tuple[str, ...]]:
        return {"histology": ("encoder",), "genomics": ("snn",)}


_ARCHS = {"smm": SMMModel, "snn": SNNModel, "abmil": ABMILModel, "concat": ConcatModel}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by ``cfg.arch``; all share the Batch -> ModelOutput interface."""
    return _ARCHS[cfg.arch](cfg)


def trained_parameters(model: nn.Module, modalities: tuple[str, ...] | list[str]) -> list[str]:
    """The state-dict names a site holding only ``modalities`` trains, in the state dict's order.

    A site-level fact: it follows from the architecture and which modalities the site has, never
    from its patients, so the server learns no more from it than that the site lacks a modality.
    Raises ValueError when the site cannot train the architecture at all (``snn`` without
    genomics, ``abmil`` without slides) or names no or an unknown modality.
    """
    have = set(modalities)
    if not have or not have <= set(MODALITIES):
        raise ValueError(f"modalities {sorted(have)}: expected a non-empty subset of {list(MODALITIES)}")
    reads = model.reads_modalities  # type: ignore[attr-defined]
    if not have & set(reads):
        raise ValueError(f"{type(model).__name__} reads {' and '.join(reads)}, which the site does not have")
    reach = model.modality_parameters()  # type: ignore[attr-defined]
    skip = tuple(p for m in MODALITIES if m not in have for p in reach[m])
    return [k for k in model.state_dict() if not any(k == p or k.startswith(p + ".") for p in skip)]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
