"""Lightning callbacks rectrain adds to the stock ones."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger


class ItemEmbeddingProjector(pl.Callback):
    """Writes the trained item embeddings to TensorBoard's projector, labelled with titles and categories.

    Only the ``max_items`` most popular items are written: the projector gets slow beyond ~10k
    points, and popular items are the ones a person can judge.
    """

    def __init__(self, max_items: int = 5000) -> None:
        self.max_items = max_items

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        net = getattr(pl_module, "net", None)
        if logger is None or net is None or not hasattr(net, "item_embeddings") or trainer.global_rank != 0:
            return
        data = trainer.datamodule.data
        with torch.no_grad():
            emb = net.item_embeddings().detach().float().cpu()
        popularity = torch.as_tensor(data.item_popularity("valid"))
        keep = torch.argsort(popularity, descending=True, stable=True)[: self.max_items]
        titles = data.item_titles if data.item_titles.size else data.item_vocab
        cats = data.item_category_indptr
        labels = []
        for i in keep.tolist():
            names = data.category_vocab[data.item_category_index[cats[i]:cats[i + 1]]] if data.n_categories else []
            # tabs and newlines would break the projector's TSV metadata
            title = str(titles[i]).replace("\t", " ").replace("\n", " ") or str(data.item_vocab[i])
            labels.append([title, "|".join(names), str(int(popularity[i]))])
        logger.experiment.add_embedding(emb[keep], metadata=labels, metadata_header=["title", "categories", "popularity"],
                                        tag="item_embeddings", global_step=trainer.global_step)
