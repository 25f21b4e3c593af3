"""Checkpoint -> ONNX files that a torch-free service can load: :func:`export_checkpoint`.

What is written next to ``output`` (``model.onnx`` here):

* two-tower: ``model.onnx`` (``recommend``: history, lengths, exclude, k -> items, scores), and for
  services with their own ANN index ``model.query.onnx`` (history, lengths -> query) and
  ``model.item_vectors.onnx`` (items -> item_vectors);
* NCF family: ``model.onnx`` (``recommend``: user, exclude, k -> items, scores), ``model.score.onnx``
  (user, item -> scores) and ``model.user_vocab.json`` (raw user ids: personal data, never inside a
  model file; the ONNX metadata pins it by sha256);
* with ``quantize=True`` also ``model.int8.onnx`` (dynamic int8 ``recommend`` graph);
* two-tower with an ANN index (``ann=auto``: IVF from ``ann_min_items`` items; or ``ann=ivf|hnsw``):
  ``model.ann.faiss``, a faiss index over the item vectors, pinned by sha256 like the other
  companions, its build and tuned search settings in ``rectrain.ann`` (:mod:`rectrain.ann`).

Order of work: trace every graph (legacy TorchScript exporter, dynamic batch/length/exclusion/k axes),
check that those axes came out symbolic, compare onnxruntime with PyTorch (:mod:`rectrain.export.parity`),
attach metadata, run ``onnx.checker``, and only then write. All files are first written to temporary
names in the destination folder and renamed at the end: a failed export leaves no file behind.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from rectrain.errors import RectrainError
from rectrain.export.ann_index import build_for_export, choose_kind
from rectrain.export import metadata as md
from rectrain.export.graphs import NCF, TWO_TOWER, GraphSpec, graph_specs
from rectrain.export.parity import DEFAULT_TOLERANCE, ParityError, TorchReference, check_graph
from rectrain.runs import model_kind
from rectrain.utils.io import file_sha256, remove_stale_temporaries, temp_prefix

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


class ExportError(RectrainError):
    """The export cannot produce a file a service may trust (parity, frozen axes, missing sidecar)."""


@dataclass
class ExportReport:
    """What an export wrote and measured.

    Attributes:
        kind: ``two_tower`` or ``ncf``.
        files: role (``recommend``, ``query``, ``item_vectors``, ``score``, ``user_vocab``, ``int8``) -> path written.
        sha256: role -> sha256 of the file written.
        opset: ONNX opset of every graph.
        parity: graph -> parity figures (cases, max abs/rel difference, top-K positions compared).
        metadata: the ``rectrain.*`` metadata of the main file (keys without the prefix).
        quantization: float vs int8 validation metrics, or None.
        ann: the ANN index's settings (kind, build and search parameters, measured recall), or None.
        seconds: wall time of the whole export.
    """

    kind: str
    files: dict[str, Path] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    opset: int = DEFAULT_OPSET
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    ann: dict[str, Any] | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for the console."""
        lines = [f"exported {self.kind} model (opset {self.opset}) in {self.seconds:.1f} s:"]
        for role, path in self.files.items():
            lines.append(f"  {role:<12} {path}  sha256 {self.sha256[role][:12]}")
        for graph, p in self.parity.items():
            line = f"  parity {graph}: {p['cases']} cases, max |onnx - torch| {p['max_abs_diff']:.2e}"
            if p["topk_positions_compared"] or p["tied_positions_skipped"]:
                line += (f", {p['topk_positions_compared']} top-k positions identical "
                         f"({p['tied_positions_skipped']} within the tolerance of a neighbour, not compared)")
            lines.append(line)
        if self.ann:
            a = self.ann
            search = ", ".join(f"{k} {v}" for k, v in a["search"].items())
            lines.append(f"  ann {a['kind']}: {a['n_items']:,} items, recall@10 {a.get('recall_at_10', float('nan')):.4f} "
                         f"against exact ({search}, {a['fetch']} candidates re-scored), built in "
                         f"{a['build_seconds']:.1f} s")
        if self.quantization:
            q = self.quantization
            lines.append(f"  int8: validation ndcg@{q['k']} {q['float']['ndcg@' + str(q['k'])]:.4f} -> "
                         f"{q['int8']['ndcg@' + str(q['k'])]:.4f} (difference {q['ndcg_difference']:+.4f}), "
                         f"size {q['float_bytes'] / 1e6:.2f} MB -> {q['int8_bytes'] / 1e6:.2f} MB")
        return "\n".join(lines)


def output_paths(output: str | os.PathLike[str], kind: str) -> dict[str, Path]:
    """Role -> path for every file an export of ``kind`` may write next to ``output``."""
    main = Path(output)
    stem = main.name[:-5] if main.name.endswith(".onnx") else main.name
    folder = main.parent
    paths = {"recommend": main, "int8": folder / f"{stem}.int8.onnx"}
    if kind == TWO_TOWER:
        paths["query"] = folder / f"{stem}.query.onnx"
        paths["item_vectors"] = folder / f"{stem}.item_vectors.onnx"
        paths["ann_index"] = folder / f"{stem}.ann.faiss"
    else:
        paths["score"] = folder / f"{stem}.score.onnx"
        paths["user_vocab"] = folder / f"{stem}.user_vocab.json"
    return paths


def trace(spec: GraphSpec, opset: int) -> onnx.ModelProto:
    """Export one graph with the legacy (TorchScript) exporter and check its dynamic axes stayed symbolic."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings and the GRU batch-size notice: the parity check below is the real guard
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module.eval(), spec.example, buffer, dynamo=False, opset_version=opset,
                          input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                          dynamic_axes=spec.dynamic_axes, do_constant_folding=True)
    model = onnx.load_from_string(buffer.getvalue())
    check_symbolic(model, spec)
    return model


def check_symbolic(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Raise ExportError when an axis meant to be dynamic was frozen to the trace example's size."""
    declared = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        if value.name not in declared:
            raise ExportError(f"graph {spec.name}: unexpected graph input/output {value.name!r}")
        want = declared[value.name].shape
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(want):
            raise ExportError(f"graph {spec.name}: {value.name} has rank {len(dims)}, expected {len(want)}")
        for axis, (dim, expected) in enumerate(zip(dims, want)):
            if isinstance(expected, str) and (dim.HasField("dim_value") or not dim.dim_param):
                raise ExportError(f"graph {spec.name}: axis {axis} of {value.name} was frozen to "
                                  f"{dim.dim_value} by the trace example; it must stay symbolic ({expected})")


def _session(model: onnx.ModelProto, threads: int = 1) -> Any:
    return ort_session(model.SerializeToString(), threads)


def ort_session(blob: bytes, threads: int = 1) -> Any:
    """An onnxruntime CPU session over serialised model bytes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])


@dataclass
class AnnOptions:
    """``export.py ann*=`` settings (see :mod:`rectrain.export.ann_index` and :mod:`rectrain.ann`).

    Attributes:
        kind: ``auto`` (IVF for two-tower catalogs of at least ``min_items`` items), ``hnsw``, ``ivf`` or ``none``.
        min_items: the catalog size from which ``auto`` builds an index.
        recall: the recall@10 against exact top-10 the search effort is tuned to reach.
        m, ef_construction: HNSW graph degree and build width.
        fetch: candidates fetched per query and re-scored exactly (at least; exclusions add to it).
        head: items with the largest norms scored exactly beside the index (None: 2% of the catalog,
            at most 32,768; 0: none; see :mod:`rectrain.ann`).
        threads: faiss build threads.
    """

    kind: str = "auto"
    min_items: int = 100_000
    recall: float = 0.98
    m: int = 32
    ef_construction: int = 80
    fetch: int = 50
    head: int | None = None
    threads: int = 1


def _prepare_net(net: nn.Module) -> nn.Module:
    net = net.eval().float()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def locate_user_vocab(facts: dict[str, Any], ckpt_path: Path | None, user_vocab: str | os.PathLike[str] | None
                      ) -> tuple[bytes, str]:
    """The user vocabulary sidecar's bytes and sha256, verified against the checkpoint's record
    (:func:`rectrain.runs.read_user_vocab`)."""
    from rectrain.runs import USER_VOCAB_FILE, read_user_vocab

    path = Path(user_vocab) if user_vocab else (ckpt_path.parent / USER_VOCAB_FILE if ckpt_path else None)
    try:
        vocab = read_user_vocab(facts, path)
    except RectrainError as exc:
        raise ExportError(str(exc)) from exc
    return vocab.blob, vocab.sha256


def export_checkpoint(ckpt_path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *,
                      opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE, quantize: bool = False,
                      user_vocab: str | os.PathLike[str] | None = None, seed: int = 0,
                      segments: str | os.PathLike[str] | None = None, ann: AnnOptions | None = None) -> ExportReport:
    """Export a rectrain checkpoint to ONNX (see the module docstring for the files written).

    Args:
        ckpt_path: a checkpoint written by ``train.py`` (loaded with ``weights_only=True``).
        output: path of the main ``.onnx`` file; default: the checkpoint's path with ``.onnx``.
        opset: ONNX opset of every graph.
        tolerance: parity tolerance, ``|onnx - torch| <= tolerance * max(1, |torch|)``.
        quantize: also write a dynamic int8 ``recommend`` graph and measure its validation NDCG@10
            against the float graph (needs the training data, rebuilt from the checkpoint's config).
        user_vocab: NCF only: the user vocabulary sidecar (default: ``user_vocab.json`` beside the checkpoint).
        seed: seed of the generated parity inputs.
        segments: ``segments.json`` written by ``segment.py`` for this checkpoint (default: the
            ``<checkpoint stem>-segments/segments.json`` beside it, when present). Its centroids go
            into the metadata so the scorer answers a history's segment; for NCF the segment of
            every user index is precomputed. A ``calibration.json`` beside the checkpoint (from
            ``calibrate.py``) is embedded the same way.
        ann: the ANN index settings (default :class:`AnnOptions`: an IVF index for two-tower
            catalogs of at least 100,000 items, exact scoring below).

    Raises:
        ExportError: parity fails, an axis froze, the user vocabulary is missing or does not match.
    """
    from rectrain.runs import open_run

    run = open_run(ckpt_path)
    facts = dict(run.facts)
    facts.update(_analytics_facts(run, segments))
    output = Path(output) if output else run.path.with_suffix(".onnx")
    return export_model(run.net, facts, output, opset=opset, tolerance=tolerance, quantize=quantize,
                        validation=md.validation_metrics(run.ckpt, run.path), ckpt_path=run.path,
                        user_vocab=user_vocab, seed=seed, ann=ann, run=run)


def _analytics_facts(run: Any, segments: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Segments and calibration fitted for this run's checkpoint, checked against its sha256
    (formats and checks: :mod:`rectrain.artifacts`)."""
    from rectrain import artifacts

    out: dict[str, Any] = {}
    calibration = artifacts.stored_calibration(artifacts.default_calibration_path(run.path), run.sha256)
    if calibration is not None:
        out["calibration"] = calibration.metadata()
    elif run.facts.get("calibration"):
        out["calibration"] = artifacts.Calibration.from_dict(run.facts["calibration"]).metadata()
    path = Path(segments) if segments else artifacts.default_segments_path(run.path)
    if segments is None and not path.is_file():
        return out
    try:
        payload = artifacts.load_segments(path)
        artifacts.check_segments_belong(payload, path, run.sha256, run.path)
    except artifacts.ArtifactError as exc:
        raise ExportError(str(exc)) from exc
    seg = artifacts.segments_metadata(payload)
    if payload.get("kind") == "ncf":
        from rectrain.models.ncf import user_vectors

        vectors, _ = user_vectors(run.net)
        seg["user_segments"] = artifacts.assign_segments(vectors, payload["centroids"],
                                                         seg["normalize"] == "l2").astype(int).tolist()
    out["segments"] = seg
    return out


def export_model(net: nn.Module, facts: dict[str, Any], output: str | os.PathLike[str], *,
                 opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE, quantize: bool = False,
                 validation: dict[str, Any] | None = None, ckpt_path: Path | None = None,
                 user_vocab: str | os.PathLike[str] | None = None, seed: int = 0,
                 ann: AnnOptions | None = None, run: Any = None) -> ExportReport:
    """Export a plain net with its checkpoint facts (``ckpt["rectrain"]``); see :func:`export_checkpoint`.

    ``run``: the :class:`rectrain.runs.Run` the net came from, whose data the int8 check ranks
    (default: a run made of ``net`` and ``facts``, its data rebuilt from ``facts["config"]``)."""
    started = time.perf_counter()
    net = _prepare_net(net)
    kind = model_kind(net)
    paths = output_paths(output, kind)
    report = ExportReport(kind=kind, opset=opset)

    user_vocab_ref, staged_bytes = None, {}
    if kind == NCF:
        blob, digest = locate_user_vocab(facts, ckpt_path, user_vocab)
        staged_bytes["user_vocab"] = blob
        user_vocab_ref = {"file": paths["user_vocab"].name, "sha256": digest, "n_users": int(facts.get("n_users") or 0),
                          "format": '{"user_vocab": [raw user id of index 0, of index 1, ...]}'}
    checkpoint_sha = file_sha256(ckpt_path) if ckpt_path else None
    if kind == TWO_TOWER and getattr(net, "repeat_bonus", None) is not None:
        static = net.repeat_bonus + net.repeat_boost * net._last_slot  # the learned values + the tuned boost
        facts = {**facts, "repeat_bonus": static.detach().cpu().tolist(), "repeat_mode": net.repeat_mode}
    common = md.common_metadata(facts, kind, opset=opset, validation=validation or {"source": "none recorded", "metrics": {}},
                                user_vocab=user_vocab_ref, checkpoint_sha256=checkpoint_sha)
    max_length = int(net.max_length) if kind == TWO_TOWER else None
    ann = ann or AnnOptions()
    ann_kind = choose_kind(ann.kind, kind=kind, n_items=int(facts.get("n_items") or getattr(net, "n_items", 0)),
                           min_items=ann.min_items, repeat_mode=getattr(net, "repeat_mode", None)
                           if getattr(net, "repeat_bonus", None) is not None else None)

    # trace and compare every graph before anything is written
    # (memory: each graph holds the catalog once, so nothing keeps a second copy of a graph - the
    # answers on the example inputs stand for the checked graph - and a companion's graph is dropped
    # once it is bytes; the peak is about ten catalogs, README "Large catalogs")
    specs = graph_specs(net)
    models: dict[str, onnx.ModelProto] = {}
    checked_answers: dict[str, list[np.ndarray]] = {}
    reference = TorchReference(net)
    for spec in specs:
        model = trace(spec, opset)
        session = _session(model)
        try:
            parity = check_graph(spec, net, session, kind, max_length=max_length, tol=tolerance, seed=seed,
                                 reference=reference)
        except ParityError as exc:
            raise ExportError(f"onnxruntime does not match PyTorch, nothing written: {exc}") from exc
        checked_answers[spec.name] = session.run(None, _example_feed(spec))
        del session
        report.parity[spec.name] = parity.as_dict()
        models[spec.name] = model

    # metadata: companions first, so the main file can pin them by sha256
    main, companions = specs[0], specs[1:]
    refs: dict[str, Any] = {}
    unfinished_main = _copy(models[main.name]) if quantize else None  # int8 is made from the checked graph
    for spec in companions:
        _finish(models[spec.name], {**common, **md.graph_metadata(spec, report.parity[spec.name])}, spec)
        staged_bytes[spec.name] = models.pop(spec.name).SerializeToString()
        _same_answers(checked_answers[spec.name], staged_bytes[spec.name], spec)
        refs[spec.name] = {"file": paths[spec.name].name, "sha256": _sha256(staged_bytes[spec.name])}
    ann_meta: dict[str, str] = {}
    if ann_kind is not None:
        index = build_for_export(
            staged_bytes["query"], staged_bytes["item_vectors"], ort_session, kind=ann_kind,
            n_items=int(net.n_items), popularity=np.asarray(facts.get("item_popularity") or np.zeros(net.n_items)),
            max_length=int(max_length or 1), user_width=int(getattr(net, "n_user_features", 0) or 0),
            target_recall=ann.recall, m=ann.m, ef_construction=ann.ef_construction, fetch=ann.fetch,
            head=ann.head, threads=ann.threads, seed=seed)
        staged_bytes["ann_index"] = index.to_bytes()
        refs["ann_index"] = {"file": paths["ann_index"].name, "sha256": _sha256(staged_bytes["ann_index"])}
        report.ann = index.settings
        ann_meta["ann"] = md.to_json(index.settings)
    main_meta = {**common, **md.graph_metadata(main, report.parity[main.name]), "companions": md.to_json(refs),
                 **ann_meta}
    _finish(models[main.name], main_meta, main)
    staged_bytes[main.name] = models.pop(main.name).SerializeToString()
    _same_answers(checked_answers[main.name], staged_bytes[main.name], main)
    report.metadata = main_meta

    if quantize:
        if run is None:
            from rectrain.runs import Run

            run = Run(path=ckpt_path or Path(str(output)), ckpt={}, facts=facts, net=net)
        int8_model, report.quantization = _quantize(unfinished_main, run, kind, max_length,
                                                    len(staged_bytes[main.name]))
        _finish(int8_model, {**main_meta, "graph": "recommend", "quantization": md.to_json(report.quantization),
                             "parity": md.to_json({"note": "int8: compared by validation metrics, not by tolerance"})},
                main)
        staged_bytes["int8"] = int8_model.SerializeToString()

    _write_all({role: (paths[role], blob) for role, blob in staged_bytes.items()}, last=paths["recommend"])
    for role, blob in staged_bytes.items():
        report.files[role] = paths[role]
        report.sha256[role] = _sha256(blob)
    report.seconds = time.perf_counter() - started
    return report


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _example_feed(spec: GraphSpec) -> dict[str, np.ndarray]:
    return {t.name: x.numpy() for t, x in zip(spec.inputs, spec.example)}


def _same_answers(want: list[np.ndarray], final: bytes, spec: GraphSpec) -> None:
    """The bytes about to be written run and answer exactly like the graph that passed parity
    (``want``: that graph's answers on the spec's example inputs)."""
    got = ort_session(final).run(None, _example_feed(spec))
    if any(not np.array_equal(a, b) for a, b in zip(want, got)):
        raise ExportError(f"graph {spec.name}: the final file answers differently from the checked graph")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _finish(model: onnx.ModelProto, meta: dict[str, str], spec: GraphSpec) -> None:
    """Attach metadata, then ``onnx.checker`` (full, with shape inference) on the final model."""
    md.attach(model, meta, doc=f"rectrain {meta['model_kind']} '{spec.name}' graph; see metadata_props rectrain.*")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"graph {spec.name}: onnx.checker rejected the model: {exc}") from exc
    check_symbolic(model, spec)


def _quantize(model: onnx.ModelProto, run: Any, kind: str, max_length: int | None,
              float_bytes: int) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from rectrain.export.quantize import onnx_ranking_metrics, quantize_int8

    int8 = quantize_int8(model)
    queries = run.data().ranking_queries("valid")
    features = run.user_features
    k = 10
    scores = {name: onnx_ranking_metrics(_session(m), kind, queries, max_length=max_length or 50, k=k,
                                         user_features=features)
              for name, m in (("float", model), ("int8", int8))}
    result = {"method": "onnxruntime.quantization.quantize_dynamic, weights QInt8", "k": k,
              "split": "valid", "queries": len(queries), "float": scores["float"], "int8": scores["int8"],
              "ndcg_difference": scores["int8"][f"ndcg@{k}"] - scores["float"][f"ndcg@{k}"],
              "float_bytes": float_bytes, "int8_bytes": int8.ByteSize()}
    return int8, result


def _write_all(files: dict[str, tuple[Path, bytes]], last: Path) -> None:
    """Write every file to a temporary name beside its target, then rename all (``last`` at the end).

    Nothing is renamed before every temporary file is complete and flushed; on any error the
    temporary files are removed, so a failed export leaves no file behind. A *killed* export
    cannot clean up after itself: its temporaries carry the writer's pid
    (:func:`rectrain.utils.io.temp_prefix`) and the next export into the folder removes those
    whose writer is gone. A kill between the renames leaves new companions beside the old main
    file, which pins its companions by sha256: a scorer refuses that mix instead of serving it.
    """
    for folder in {dest.parent for dest, _ in files.values()}:
        for stale in remove_stale_temporaries(folder):
            log.warning("removed %s, left by an export that was killed", stale.name)
    staged: list[tuple[Path, Path]] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for dest, blob in files.values():
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dest.name), suffix=".tmp", dir=dest.parent)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a service user must be able to read it
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            staged.append((Path(tmp), dest))
        staged.sort(key=lambda pair: pair[1] == last)  # the main file appears last
        for tmp, dest in staged:
            os.replace(tmp, dest)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
