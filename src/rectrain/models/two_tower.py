"""Two-tower retrieval: an RNN or causal self-attention session encoder as the query tower, an id +
side-feature item tower.

The query is the user's recent item history, so the model needs no user id (nothing personal in
the model file) and serves new users and anonymous sessions alike. The item tower adds item side
features (categories/genres) to the id embedding, so an item with no interactions still lands in
a sensible place (cold start).

Shapes: B batch, L history length, d output dim, H RNN hidden size, I catalog size, C categories.
Histories are right-padded; ``lengths`` says how many leading positions are real. The RNN is
causal, so padding *after* the last real position cannot change the state there, and taking the
state at ``lengths - 1`` needs no packed sequences (which do not export to ONNX).

``cell=transformer`` (SASRec, Kang & McAuley 2018, trained with the full softmax as in Klenitskiy &
Vasilev 2023) replaces the RNN by pre-norm self-attention blocks with a causal mask: position ``t``
attends to positions ``0..t`` only, so right padding cannot reach a real position either, and the
output at ``t`` is exactly what the prefix ``0..t`` alone gives (what all-position training needs).
Positions are learned and counted from the start of the window, as in SASRec; with a causal mask
that is the only indexing under which a training position and the evaluation of its prefix see the
same position embeddings (counting from the end would move every embedding as the prefix grows).

Repeat bonus (``repeat_slots > 0``): in click sessions the next item is often one already clicked
(the reference item-kNN gets much of its MRR from recommending the last item itself). A dot product
has no natural way to say "the item I just saw"; a learned score bonus per recency slot does:
an item ``r`` positions back from the query position gets ``bonus[min(r, repeat_slots - 1)]`` added
to its score, summed over its occurrences. It is part of training, evaluation and the exported
recommend graph alike.
"""
from __future__ import annotations

import typing
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}
#: the choices of ``model.net.cell`` and ``model.net.repeat_mode``, typed so the config check
#: (rectrain.config_checks) rejects a bad value before any data is read
Cell = Literal["gru", "lstm", "transformer"]
RepeatMode = Literal["bonus", "mixture"]
ENCODERS = typing.get_args(Cell)
REPEAT_MODES = typing.get_args(RepeatMode)
NO_REPEAT = -1e4  # log-space stand-in for log(0): finite, so exports and gradients stay clean


def last_valid(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, H) states, (B,) lengths -> (B, H) state at position ``lengths - 1`` of each row."""
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, states.shape[-1])  # (B, 1, H)
    return states.gather(1, index).squeeze(1)


def _attach_user_features(states: torch.Tensor, user_features: torch.Tensor | None, width: int) -> torch.Tensor:
    """(B, L, H) states [+ (B, F) user features, repeated at every position] -> (B, L, H [+ F])."""
    if not width:
        return states
    if user_features is None or user_features.shape[-1] != width:
        raise ValueError(f"this query tower reads {width} user features per row; "
                         f"got {None if user_features is None else tuple(user_features.shape)}")
    per_position = user_features[:, None, :].expand(-1, states.shape[1], -1)  # (B, L, F)
    return torch.cat([states, per_position.to(states.dtype)], dim=-1)  # (B, L, H + F)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions 0..t (explicit matmul + softmax:
    no fused kernel, so the legacy ONNX exporter traces it with a symbolic length)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"model.net.heads ({heads}) must divide the embedding width ({width})")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, e)
        logits = q @ k.transpose(-1, -2) / self.head_dim ** 0.5  # (B, h, L, L)
        positions = torch.arange(length, device=x.device)
        future = positions.view(1, -1) > positions.view(-1, 1)  # (L, L): key after query
        logits = logits.masked_fill(future, float("-inf"))  # every row keeps its diagonal: never all -inf
        weights = self.dropout(torch.softmax(logits, dim=-1))
        return self.out((weights @ v).transpose(1, 2).reshape(b, length, width))  # (B, L, W)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + FFN(LN(x)) (GELU, inner width ``hidden``)."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """SASRec-style query tower: item embedding + learned position embedding, ``layers`` pre-norm
    causal self-attention blocks, a final LayerNorm and the output projection; a query at every position.

    Args:
        item_embedding: the input embedding table (its width is the model width).
        dim: output (query) dimension.
        hidden: inner width of each block's feed-forward layer.
        layers: blocks.
        heads: attention heads (must divide the embedding width).
        embedding_dropout: dropout on the summed item + position embeddings.
        dropout: dropout on attention weights, block outputs and before the projection.
        max_length: positions with an embedding; a wider padded input reuses the last one for the
            padding beyond (causal: real positions never read it).
        n_user_features: as :class:`SessionEncoder`.
    """

    def __init__(self, item_embedding: nn.Embedding, dim: int, hidden: int = 128, layers: int = 2, heads: int = 2,
                 embedding_dropout: float = 0.0, dropout: float = 0.0, max_length: int = 50,
                 n_user_features: int = 0) -> None:
        super().__init__()
        width = item_embedding.embedding_dim
        self.item_embedding = item_embedding
        self.position_embedding = nn.Embedding(max_length, width)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, hidden, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.n_user_features, self.max_length = n_user_features, max_length
        self.project = nn.Linear(width + n_user_features, dim)

    def forward(self, items: torch.Tensor, user_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) item indices [, (B, F) user features] -> (B, L, d) query vectors, one per position."""
        positions = torch.arange(items.shape[1], device=items.device).clamp(max=self.max_length - 1)  # (L,)
        x = self.embedding_dropout(self.item_embedding(items) + self.position_embedding(positions)[None])  # (B, L, W)
        for block in self.blocks:
            x = block(x)
        states = self.dropout(self.norm(x))
        return self.project(_attach_user_features(states, user_features, self.n_user_features))  # (B, L, d)


class SessionEncoder(nn.Module):
    """GRU/LSTM over item embeddings; returns a query vector at every position.

    Args:
        item_embedding: the input embedding table (shared with the item tower when tied).
        dim: output (query) dimension.
        cell: ``gru`` or ``lstm``.
        hidden: RNN hidden size.
        layers: stacked RNN layers.
        embedding_dropout: dropout on the input item embeddings.
        dropout: dropout between RNN layers and before the output projection.
        n_user_features: width of optional user-side features, concatenated to the RNN state at
            every position before the projection (0: none).
    """

    def __init__(self, item_embedding: nn.Embedding, dim: int, cell: str = "gru", hidden: int = 128,
                 layers: int = 1, embedding_dropout: float = 0.0, dropout: float = 0.0,
                 n_user_features: int = 0) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"model.net.cell must be one of {sorted(CELLS)}, got {cell!r}")
        self.item_embedding = item_embedding
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.rnn = CELLS[cell](item_embedding.embedding_dim, hidden, num_layers=layers, batch_first=True,
                               dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.n_user_features = n_user_features
        self.project = nn.Linear(hidden + n_user_features, dim)

    def forward(self, items: torch.Tensor, user_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) item indices [, (B, F) user features] -> (B, L, d) query vectors, one per position."""
        x = self.embedding_dropout(self.item_embedding(items))  # (B, L, E)
        states, _ = self.rnn(x)  # (B, L, H)
        states = self.dropout(states)
        return self.project(_attach_user_features(states, user_features, self.n_user_features))  # (B, L, d)


class ItemTower(nn.Module):
    """Item vector = id embedding + MLP(category multi-hot).

    The category matrix is a buffer (saved in the state dict, filled by :meth:`set_item_features`).
    ``id_dropout`` zeroes the id part of random items during training, which teaches the feature
    part to stand on its own: that is what a cold-start item has.
    """

    def __init__(self, n_items: int, dim: int, n_categories: int = 0, hidden: Sequence[int] = (64,),
                 id_dropout: float = 0.0, sparse: bool = False) -> None:
        super().__init__()
        self.id_embedding = nn.Embedding(n_items, dim, sparse=sparse)
        nn.init.normal_(self.id_embedding.weight, std=0.05)
        self.register_buffer("categories", torch.zeros(n_items, n_categories))  # (I, C)
        self.id_dropout = id_dropout
        self.features: nn.Module | None = None
        if n_categories > 0:
            layers: list[nn.Module] = []
            width = n_categories
            for h in hidden:
                layers += [nn.Linear(width, int(h)), nn.ReLU()]
                width = int(h)
            layers.append(nn.Linear(width, dim))
            self.features = nn.Sequential(*layers)

    def forward(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) item indices (or None for the whole catalog) -> (N, d) item vectors."""
        ids = self.id_embedding.weight if items is None else self.id_embedding(items)  # (N, d)
        if self.training and self.id_dropout > 0:
            keep = torch.rand(ids.shape[0], 1, device=ids.device) >= self.id_dropout
            ids = ids * keep
        if self.features is None:
            return ids
        cats = self.categories if items is None else self.categories[items]  # (N, C)
        return ids + self.features(cats)


class TwoTower(nn.Module):
    """Query tower (session encoder) and item tower scored by a dot product.

    Args:
        n_items: catalog size.
        n_categories: width of the item category features (0: id embeddings only).
        dim: size of query and item vectors.
        cell, hidden, layers, embedding_dropout, dropout: the session encoder: ``gru``/``lstm`` (see
            SessionEncoder) or ``transformer`` (see TransformerEncoder: ``hidden`` is the feed-forward
            width, ``layers`` the blocks).
        heads: attention heads of the transformer (ignored by the RNNs).
        item_hidden: hidden widths of the item tower's feature MLP.
        id_dropout: see ItemTower.
        tie_embeddings: the query tower reads the item tower's id embeddings (fewer parameters,
            and what the model learns about an item as a target it also uses as input).
        normalize: L2-normalise query and item vectors (cosine scores).
        temperature: scores are divided by this (matters with ``normalize``).
        max_length: the most recent items a query reads; longer histories are cut to their tail.
        repeat_slots: learned score bonus for items already in the history, one value per recency
            slot (0: the last item, 1: the one before, ...; older items share the last slot).
            0 disables it (scores are then a pure dot product, as an ANN index needs).
        repeat_gate: make the slot bonus a linear function of the query as well (per session:
            some sessions keep re-clicking, some never do).
        repeat_mode: ``bonus`` adds the slot values to the history items' logits; ``mixture``
            (RepeatNet, Ren et al. 2019) scores log P = log(p * P_repeat + (1 - p) * P_explore):
            P_explore the softmax over the catalog, P_repeat an attention over the history
            positions (slot values as logits), p = sigmoid(linear(query)). A bonus in logit space
            is drowned out when the explore distribution is peaked; a mixture keeps a repeat's
            probability at least p * attention. Needs ``model.loss=full``.
        n_user_features: width of the encoded user-side features the query tower reads (0: none;
            set from ``data.user_features``). Attributes, never a user id.
        sparse: item id embeddings with sparse gradients (train with ``rectrain.models.optim.LazyAdam``
            and ``model.loss=sampled``: a step then updates the rows it touched, not the catalog).
    """

    def __init__(self, n_items: int, n_categories: int = 0, dim: int = 64, cell: Cell = "gru", hidden: int = 128,
                 layers: int = 1, embedding_dropout: float = 0.2, dropout: float = 0.2,
                 item_hidden: Sequence[int] = (64,), id_dropout: float = 0.0, tie_embeddings: bool = True,
                 normalize: bool = False, temperature: float = 1.0, max_length: int = 50,
                 repeat_slots: int = 0, repeat_gate: bool = False, repeat_mode: RepeatMode = "bonus",
                 n_user_features: int = 0, heads: int = 2, sparse: bool = False) -> None:
        super().__init__()
        if cell not in ENCODERS:
            raise ValueError(f"model.net.cell must be one of {list(ENCODERS)}, got {cell!r}")
        if temperature <= 0:
            raise ValueError("model.net.temperature must be > 0")
        if repeat_slots < 0:
            raise ValueError("model.net.repeat_slots must be >= 0")
        if repeat_mode not in REPEAT_MODES:
            raise ValueError(f"model.net.repeat_mode must be one of {REPEAT_MODES}, got {repeat_mode!r}")
        self.config = {"n_items": n_items, "n_categories": n_categories, "dim": dim, "cell": cell, "hidden": hidden,
                       "layers": layers, "embedding_dropout": embedding_dropout, "dropout": dropout,
                       "item_hidden": [int(h) for h in item_hidden], "id_dropout": id_dropout,
                       "tie_embeddings": tie_embeddings, "normalize": normalize, "temperature": temperature,
                       "max_length": max_length, "repeat_slots": repeat_slots, "repeat_gate": repeat_gate, "repeat_mode": repeat_mode,
                       "n_user_features": n_user_features, "heads": heads, "sparse": sparse}
        self.n_items, self.max_length, self.n_user_features = n_items, max_length, n_user_features
        self.normalize, self.temperature = normalize, temperature
        self.item_tower = ItemTower(n_items, dim, n_categories, item_hidden, id_dropout, sparse)
        input_embedding = self.item_tower.id_embedding if tie_embeddings else nn.Embedding(n_items, dim, sparse=sparse)
        self.query_tower: nn.Module
        if cell == "transformer":
            self.query_tower = TransformerEncoder(input_embedding, dim, hidden, layers, heads, embedding_dropout,
                                                  dropout, max_length, n_user_features)
        else:
            self.query_tower = SessionEncoder(input_embedding, dim, cell, hidden, layers, embedding_dropout, dropout,
                                              n_user_features)
        self.repeat_bonus = nn.Parameter(torch.zeros(repeat_slots)) if repeat_slots else None
        if repeat_slots:
            # added to slot 0 (the last item) outside training only: a decision rule chosen on validation
            # (TwoTowerTask.tune_repeat_boost), not a learned weight; saved with the model
            self.register_buffer("repeat_boost", torch.zeros(()))
            self.register_buffer("_last_slot", torch.eye(repeat_slots)[0], persistent=False)
        self.repeat_gate: nn.Linear | None = None
        if repeat_slots and repeat_gate:
            self.repeat_gate = nn.Linear(dim, repeat_slots)
            nn.init.zeros_(self.repeat_gate.weight)  # starts as the plain per-slot constants
            nn.init.zeros_(self.repeat_gate.bias)
        self.repeat_mode = repeat_mode
        # mixture: the probability that the next item is a repeat, from the query
        self.repeat_switch = nn.Linear(dim, 1) if repeat_slots and repeat_mode == "mixture" else None

    def set_item_features(self, categories: torch.Tensor) -> None:
        """Copy the (I, C) category multi-hot matrix into the item tower."""
        self.item_tower.categories.copy_(torch.as_tensor(categories, dtype=torch.float32))

    def _post(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.normalize else x

    def query_all_positions(self, items: torch.Tensor, user_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) [, (B, F)] -> (B, L, d) query vectors after every prefix (training on every position)."""
        return self._post(self.query_tower(items, user_features))

    def query(self, items: torch.Tensor, lengths: torch.Tensor, user_features: torch.Tensor | None = None
              ) -> torch.Tensor:
        """(B, L) histories, (B,) lengths [, (B, F) user features] -> (B, d) queries at the last real position."""
        return last_valid(self.query_all_positions(items, user_features), lengths)

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) item indices or None -> (N, d) item vectors (the whole catalog for None)."""
        return self._post(self.item_tower(items))

    def score(self, queries: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """(..., d) queries x (N, d) items -> (..., N) scores.

        (B, d) queries go through ``addmm`` (ONNX: one Gemm, transB=1, that reads the table as it
        is): ``queries @ item_vectors.T`` in the recommend graph, which also reads the table for the
        history, was constant-folded into a transposed second copy of the catalog (twice the file;
        protobuf's 2 GB limit at ~4M items x 64 dims)."""
        if queries.dim() == 2:
            return torch.addmm(queries.new_zeros(1), queries, item_vectors.t()) / self.temperature
        return queries @ item_vectors.T / self.temperature

    def repeat_values(self, queries: torch.Tensor) -> torch.Tensor:
        """(N, d) queries -> (N, R) bonus per recency slot: the learned constants, plus a linear
        function of the query when ``repeat_gate`` (a session that keeps re-clicking says so in its
        state)."""
        assert self.repeat_bonus is not None
        values = self.repeat_bonus if self.training else self.repeat_bonus + self.repeat_boost * self._last_slot
        values = values.expand(queries.shape[0], -1)
        return values + self.repeat_gate(queries) if self.repeat_gate is not None else values

    def _bonus_by_distance(self, back: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(N, L) positions back from each query (negative: after it) -> (N, L) bonus (0 after the query)."""
        slots = back.clamp(0, self.repeat_bonus.shape[0] - 1)  # type: ignore[union-attr]
        values = self.repeat_values(queries).gather(1, slots)
        return values * (back >= 0).to(values.dtype)

    def history_scores(self, queries: torch.Tensor, item_vectors: torch.Tensor, history: torch.Tensor,
                       back: torch.Tensor) -> torch.Tensor:
        """(N, d) queries x (I, d) catalog -> (N, I) scores, the repeat mechanism applied to the (N, L)
        ``history`` items, each ``back`` positions behind its query (negative: not yet seen)."""
        scores = self.score(queries, item_vectors)
        if self.repeat_bonus is None:
            return scores
        if self.repeat_switch is None:
            return scores.scatter_add(1, history, self._bonus_by_distance(back, queries))
        return self._repeat_mixture(scores, queries, history, back)

    def _repeat_mixture(self, logits: torch.Tensor, queries: torch.Tensor, history: torch.Tensor,
                        back: torch.Tensor) -> torch.Tensor:
        """log(p * P_repeat + (1 - p) * softmax(logits)), computed in log space."""
        visible = back >= 0
        slots = back.clamp(0, self.repeat_bonus.shape[0] - 1)  # type: ignore[union-attr]
        attention_logits = self.repeat_values(queries).gather(1, slots).masked_fill(~visible, NO_REPEAT)
        attention = torch.softmax(attention_logits, dim=1) * visible.to(logits.dtype)  # (N, L)
        repeat = torch.zeros_like(logits).scatter_add(1, history, attention)  # (N, I)
        switch = self.repeat_switch(queries)  # type: ignore[misc]  # (N, 1) logit of p
        log_explore = torch.log_softmax(logits, dim=1) + F.logsigmoid(-switch)
        log_repeat = torch.where(repeat > 0, torch.log(repeat.clamp_min(1e-30)),
                                 torch.full_like(repeat, NO_REPEAT)) + F.logsigmoid(switch)
        top = torch.maximum(log_explore, log_repeat)
        return top + torch.log(torch.exp(log_explore - top) + torch.exp(log_repeat - top))

    def score_histories(self, queries: torch.Tensor, item_vectors: torch.Tensor, items: torch.Tensor,
                        lengths: torch.Tensor) -> torch.Tensor:
        """(B, d) queries of the (B, L) histories x (I, d) catalog -> (B, I) scores, repeats included."""
        positions = torch.arange(items.shape[1], device=items.device)
        back = lengths.view(-1, 1) - 1 - positions.view(1, -1)  # (B, L): 0 at the last real item
        return self.history_scores(queries, item_vectors, items, back)

    def forward(self, items: torch.Tensor, lengths: torch.Tensor, user_features: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, L), (B,) [, (B, F)] -> (B, I) scores over the whole catalog."""
        return self.score_histories(self.query(items, lengths, user_features), self.item_vectors(), items, lengths)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_vectors()
