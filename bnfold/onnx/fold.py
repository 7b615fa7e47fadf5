"""The ONNX fold pass: apply every enabled rule until nothing changes, in the main graph and every subgraph."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx

from ..errors import InputError
from ..report import FoldReport, Merge, Skip
from .external import ExternalData
from .io import materialize
from .graph import GraphIndex, ModelContext
from .nodes import free_names, node_label, subgraphs
from .merge import MERGE_RULE_NAMES, MERGES, MergeRule, forget_unmergeable_exact
from .ops import LinearOp, batchable
from .plan import Plan, Refusal, apply_plan
from .prefetch import prefetch_batchnorm_affines, prefetch_linear_plans
from .rules import (RULE_NAMES, AffineAfterLinear, FoldAfter, Rule, batchnorm_affine, check_batchnorm_channels,
                    current_rules)

PER_SAMPLE_NORMS = {
    "LayerNormalization": "normalizes each sample over its own features",
    "InstanceNormalization": "normalizes each sample and channel over its own spatial values",
    "GroupNormalization": "normalizes each sample over groups of its own channels",
}
_MUL_ADD = AffineAfterLinear.sources
#: Every name ``--skip`` takes: the fold rules, then the branch-merge rules.
ALL_RULE_NAMES: tuple[str, ...] = RULE_NAMES + MERGE_RULE_NAMES
# Merging stops after this many merge-then-fold rounds; each round removes nodes, so real graphs end far sooner.
_MAX_MERGE_ROUNDS = 1000


def select_rules(skip: Iterable[str] = ()) -> "tuple[Rule | MergeRule, ...]":
    """The fold rules of the descriptor table as it is now and the merge rules, less those named in ``skip``."""
    folds = current_rules()
    if _selected[0] is not folds:  # (the table changed: a new descriptor)
        _selected[:] = [folds, (*folds, *MERGES)]
    rules = _selected[1]
    if not skip:
        return rules
    skip = set(skip)
    names = [r.name for r in rules]
    unknown = skip - set(names)
    if unknown:
        raise InputError(f"unknown rule {', '.join(sorted(unknown))} (choose from {', '.join(names)})")
    return tuple(r for r in rules if r.name not in skip)


_selected: list = [None, ()]  # [the fold rules of the table, those and the merge rules]


@dataclass(frozen=True)
class RuleSet:
    """What the pass derives from its rules, once per distinct rule list (a small model's whole fold costs about
    as much as deriving it every time): the fold rules by what they start from, the merge rules, the ops the index
    lists, and the linear ops the batched path folds into."""

    bn_rules: tuple[Rule, ...]
    affine_rules: tuple[Rule, ...]
    merges: tuple[MergeRule, ...]
    merges_by_op: dict[str, tuple[MergeRule, ...]]  # op type -> the merge rules that start from it, in order
    fold_starts: frozenset[str]  # op types a fold rule starts from (BatchNormalization always: BNs are counted)
    watch: frozenset[str]  # what the index lists: fold starts, merge sources, per-sample norms
    batchable_ops: dict[str, tuple[LinearOp, str]]  # op type -> (descriptor, its after-rule), for prefetch


@functools.lru_cache(maxsize=64)
def rule_set(rules: "tuple[Rule | MergeRule, ...]") -> RuleSet:
    """The :class:`RuleSet` of ``rules`` (cached: the rule objects of a table stay the same between calls)."""
    folds = [r for r in rules if not isinstance(r, MergeRule)]
    merges = tuple(r for r in rules if isinstance(r, MergeRule))
    bn_rules = tuple(r for r in folds if "BatchNormalization" in r.sources)
    fold_starts = frozenset({"BatchNormalization"}).union(*(r.sources for r in folds))
    merge_sources = frozenset().union(*(r.sources for r in merges))
    merges_by_op = {op: tuple(r for r in merges if op in r.sources) for op in merge_sources}
    # Linear op -> BN plans computed ahead. The after-rules come first in build_rules(), so for a BN after a
    # batchable op the per-node path would return that op's after-rule plan: the same plan, made one by one.
    batchable_ops = {r.op.op_type: (r.op, r.name) for r in bn_rules if isinstance(r, FoldAfter) and batchable(r.op)}
    return RuleSet(bn_rules, tuple(r for r in folds if r.sources & _MUL_ADD), merges, merges_by_op, fold_starts,
                   fold_starts | merge_sources | PER_SAMPLE_NORMS.keys(), batchable_ops)


def fold_model(model: onnx.ModelProto, rules: "Iterable[Rule | MergeRule]",
               replacements: "dict[str, np.ndarray] | None" = None, external: "ExternalData | None" = None,
               *, batched: bool = True) -> FoldReport:
    """Fold ``model`` in place and say what happened.

    ``batched=False`` leaves out the batched path (:mod:`bnfold.onnx.prefetch`): every fold is planned node by
    node. The result is the same bytes (tests/test_plans.py), only slower on models with many layers.

    With a ``replacements`` dict, new values of main-graph initializers are left there (name -> array) for
    :func:`bnfold.onnx.io.save_model` to write, instead of being copied into the protobuf. ``external`` serves the
    main graph's initializers of a lazily loaded model (:func:`bnfold.onnx.io.load_model_lazily`).
    """
    report = FoldReport()
    ctx = ModelContext(model, external, defer_writes=replacements is not None)
    rs = rule_set(tuple(rules))
    ctx.merging = bool(rs.merges)
    # Overflow and invalid values are checked for where they matter (a fold with them is refused); one errstate
    # for the whole pass, because entering one costs more than most of the small array operations it covers.
    with np.errstate(all="ignore"):
        main = _fold_graph(GraphIndex(model.graph, ctx, watch=rs.watch), rs, report, batched)
    for function in model.functions:
        for node in function.node:
            if node.op_type == "BatchNormalization":
                report.bn_before += 1
                report.bn_after += 1
                report.skipped.append(Skip(node_label(node), "inside model-local function "
                                           f"{function.domain}.{function.name}: functions are left as they are",
                                           code="inside-function"))
    if replacements is None:
        materialize(model, ctx.replacements, main.initializers)
    else:
        replacements.update(ctx.replacements)
    if ctx.used_initializer_inputs:
        report.notes.append(f"IR version {ctx.ir_version} < 4 lists initializers as graph inputs too; "
                            "they were treated as constants, as that format intends")
    return report


def _merge_and_refold(index: GraphIndex, rs: RuleSet, report: FoldReport, batched: bool) -> GraphIndex:
    """Merge branches in the graph of ``index``, fold what the merges made foldable (a BN after an AveragePool is
    after a Conv once the pool is merged into it), and again, until neither changes anything. Returns the last
    index of the graph. ``report`` is this graph's own (not its subgraphs').

    The fold rounds after the first report their folds; the BatchNormalization count left and the reasons are
    those of the last round, which saw the final graph."""
    for _ in range(_MAX_MERGE_ROUNDS):
        refused: list[Skip] = []
        if not _merge_graph(index, rs, report, refused):
            report.not_merged = refused
            break
        again = FoldReport()
        index = GraphIndex(index.graph, index.ctx, parent=index.parent, path=index.path, watch=rs.watch,
                           exact=index.exact)
        _fold_nodes(index, rs, again, batched)
        report.folded += again.folded
        report.bn_after = again.bn_after
        report.skipped = again.skipped
    return index


def _merge_graph(g: GraphIndex, rs: RuleSet, report: FoldReport, refused: list[Skip]) -> bool:
    """One sweep of the merge rules over ``g``, each plan applied as soon as it is made (a merge changes what the
    next one reads); True when anything was merged. A BatchNormalization a merge absorbs (a lone BN branch, a BN
    after an AveragePool) is also listed in ``folded``, with the merge's rule. Commits its edits."""
    changed = False
    # The index lists the default-domain nodes of the merge rules' source ops as it reads the graph (RuleSet.watch):
    # no walk over every node. A node an earlier merge or fold changed is judged by what it is now.
    rules_for = rs.merges_by_op
    for node in g.watched:  # (the index built it; edits never change it)
        rules = rules_for.get(node.op_type)
        if rules is None or g.is_removed(node):
            continue
        for rule in rules:
            plan = rule.match(g, node)
            if plan is None:
                continue
            if isinstance(plan, Refusal):
                refused.append(Skip(node_label(node), str(plan), op_type=node.op_type, graph=g.path, code=plan.code))
                break
            merge: Merge = apply_plan(g, plan)
            if g.exact:
                forget_unmergeable_exact(g, plan)
            report.merged.append(merge)
            report.folded += merge.folds()
            changed = True
            break
    if changed:
        g.commit()
    return changed


def _fold_graph(g: GraphIndex, rs: RuleSet, report: FoldReport, batched: bool = True) -> GraphIndex:
    """Fold the graph of ``g``, merge its branches (folding again what merges make foldable), then do the same in
    every subgraph (If/Loop/Scan bodies). Returns the graph's last index (a merge round re-indexes it)."""
    own = FoldReport()
    _fold_nodes(g, rs, own, batched)
    if rs.merges:
        g = _merge_and_refold(g, rs, own, batched)
    report.bn_before += own.bn_before
    report.bn_after += own.bn_after
    report.folded += own.folded
    report.skipped += own.skipped
    report.merged += own.merged
    report.not_merged += own.not_merged
    for node in g.nodes_with_subgraphs:
        if g.is_removed(node):
            continue
        bodies = list(subgraphs(node))
        read_before = set().union(*(free_names(b) for _, b in bodies))
        for attr_name, sub in bodies:
            path = f"{g.path}/" if g.path else ""
            _fold_graph(GraphIndex(sub, g.ctx, parent=g, path=f"{path}{node_label(node)}.{attr_name}",
                                   watch=rs.watch), rs, report, batched)
        # a fold or merge inside may have stopped reading an outer value (BN parameters, a weight now copied
        # locally, the branches a merge removed)
        for name in read_before - set().union(*(free_names(b) for _, b in bodies)) - set(node.input):
            g.drop_use(name, node)
    g.commit()
    g.exact.clear()  # the float64 values served this graph's merges and its subgraphs'; they are done
    return g


def _fold_nodes(g: GraphIndex, rs: RuleSet, report: FoldReport, batched: bool = True) -> None:
    """Fold the normalizations of the graph of ``g`` itself (not its subgraphs) until nothing changes; commits."""
    bn_rules, affine_rules = rs.bn_rules, rs.affine_rules
    # Every node a rule starts from (folds never create new ones; a BN turned into an Add stays the same node),
    # and the per-sample norms to report, as the index found them (it also lists the merges' sources).
    candidates, per_sample, batchnorms = [], [], []
    starts = rs.fold_starts
    for node in g.watched:
        op = node.op_type
        if op in starts:
            candidates.append(node)
            if op == "BatchNormalization":
                batchnorms.append(node)
        elif op in PER_SAMPLE_NORMS:
            per_sample.append(node)
    report.bn_before += len(batchnorms)
    prefetched, ready = {}, {}
    if batched:
        prefetched = prefetch_batchnorm_affines(g, batchnorms)
        ready = prefetch_linear_plans(g, batchnorms, prefetched, rs.batchable_ops)
    while True:
        changed = False
        skipped: list[Skip] = []
        for node in candidates:
            if g.is_removed(node):
                continue
            op = node.op_type
            if op == "BatchNormalization":
                ahead = ready.pop(id(node), None) if ready else None
                if ahead is not None and ahead[0].holds(g):
                    plan = ahead[0]
                    check_batchnorm_channels(g, node, ahead[1])  # an annotated shape that disagrees: invalid
                else:
                    plan = _fold_batchnorm(g, node, bn_rules, prefetched)
                if isinstance(plan, Refusal):
                    skipped.append(Skip(node_label(node), str(plan), graph=g.path, code=plan.code))
                    continue
            elif op in _MUL_ADD and affine_rules:
                plan = next((p for p in (r.match(g, node) for r in affine_rules) if p is not None), None)
                if plan is None:
                    continue
            else:
                continue
            report.folded.append(apply_plan(g, plan))
            if g.exact:
                forget_unmergeable_exact(g, plan)
            changed = True
        if not changed:
            break
    report.skipped.extend(skipped)
    report.bn_after += sum(1 for n in batchnorms if not g.is_removed(n) and n.op_type == "BatchNormalization")
    for node in per_sample:
        report.skipped.append(Skip(node_label(node), f"not foldable: per-sample statistics ({node.op_type} "
                                   f"{PER_SAMPLE_NORMS[node.op_type]}), no fixed affine exists",
                                   op_type=node.op_type, graph=g.path, code="per-sample-statistics"))
    g.commit()


def _fold_batchnorm(g: GraphIndex, node: onnx.NodeProto, rules: list[Rule], prefetched: dict) -> Plan | Refusal:
    """A Plan for the first rule that folds this BatchNormalization, else the reason none did (the first code)."""
    norm = batchnorm_affine(g, node, prefetched)
    if isinstance(norm, Refusal):
        return norm
    reasons: list[Refusal] = []
    for rule in rules:
        outcome = rule.match(g, norm)
        if outcome is None:
            continue
        if not isinstance(outcome, Refusal):
            return outcome
        reasons.append(outcome)
    if reasons:
        return Refusal(reasons[0].code, "; ".join(dict.fromkeys(reasons)))
    before = g.producer.get(norm.x)
    after = g.consumers.get(norm.y, [])
    src = f"{before.op_type} {node_label(before)}" if before is not None else f"graph input '{norm.x}'"
    dst = ", ".join(f"{u.op_type} {node_label(u)}" for u in after[:3]) or "nothing"
    if norm.y in g.outputs:
        dst += " and the graph output"
    if not rules:
        return Refusal("rules-skipped", "every rule was skipped")
    return Refusal("no-linear-neighbour", f"no foldable linear op next to it (input from {src}, output to {dst})")


def fold_onnx(model: "onnx.ModelProto | str | os.PathLike", *, skip: Iterable[str] = (),
              inplace: bool = False) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every BatchNormalization that folds exactly; return the folded model and a report.

    ``model`` is a ModelProto (copied unless ``inplace=True``) or a path (loaded, external data included).
    ``skip`` names rules to leave out (see ``bnfold.onnx.rules.RULE_NAMES``). Prints nothing.
    """
    from .io import load_model

    rules = select_rules(skip)
    if isinstance(model, onnx.ModelProto):
        if not inplace:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            model = copy
    else:
        model = load_model(model)
    report = fold_model(model, rules)
    return model, report


def __getattr__(name: str):
    # fold_file (load, fold, save: bnfold.pipeline) is importable from here too, where it was first defined; the
    # pipeline imports this module, so the name is looked up when first asked for.
    if name == "fold_file":
        from ..pipeline import fold_file

        return fold_file
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
