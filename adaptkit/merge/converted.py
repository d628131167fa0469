"""A checkpoint's tensors as transformers 5 loads them (its conversion table): the layout mergekit 0.1.5 merges in.

mergekit 0.1.5 reads a checkpoint through transformers 5's conversion table (`transformers.conversion_mapping`;
its `architecture/conversion.py`) and merges the tensors as a transformers 5 model holds them: a Mixtral's
`block_sparse_moe.experts.{e}.w1.weight` and `w3` of every expert become one `mlp.experts.gate_up_proj`
(the experts stacked, then w1's and w3's stacks concatenated on their rows), the `w2`s one
`mlp.experts.down_proj`, its router `block_sparse_moe.gate` is `mlp.gate`.

An elementwise method without filters gives the same numbers either way. Any other method takes its
statistics per tensor (an angle, a top-k, a variance, a norm), so mergekit's see all experts of a layer at
once; and a `filter:` matches the names it sees (`mlp` matches `mlp.experts.down_proj`, not the checkpoint's
`block_sparse_moe.experts.0.w2.weight`). For those merges the plan does the same (`fuse`): each group of
checkpoint tensors is one merge, under transformers 5's name, of the inputs' tensors built as transformers
builds them; the result is split back and written as the checkpoint stores it, a layout transformers 4 and
5 both load (mergekit writes the fused one). Measured on `benchmarks/arch_recipes.yml`'s Mixtral, Qwen3-MoE
and GLM-4-MoE stand-ins: every deterministic method gives mergekit's bytes this way, where merging each
expert's matrix alone differed (slerp over slices: 12 of 39 tensors). A conversion step other than stacking,
concatenating (stacks, or separate tensors) and splitting one tensor's rows (below) is not followed: the merge
then warns that mergekit's numbers differ.

mergekit converts a tensor only where the name its architecture lists is not in the checkpoint (its
`io/tasks.py`): a step that keeps the name (a transpose, a permutation in place) is never applied; for an
architecture it defines, the names it lists decide (Mixtral's the fused ones, Granite-4's the stored ones),
and for one it infers from transformers 5 (GTE, Nomic-BERT, …), transformers 5's names are its names. So a
model type whose table at most renames (`ONLY_RENAMED`: the architectures mergekit defines, and other common
ones) is read through no table, unless it has per-expert tensors; any other is read through its table, whose
renames then count for filters (GTE's `attention.o_proj` is `self_attn.o_proj`) and whose splits are followed:
one stored tensor cut into equal chunks of its rows (GTE's `qkv_proj` into q, k and v) is merged part by
part, as mergekit merges them, each written back at its rows (measured on `benchmarks/arch_recipes.yml`'s GTE:
a gradient slerp and TIES differed in 20 and 19 of 68 tensors, now none), and tensors concatenated into one
(Kimi-Linear's q, k and v convolutions) are merged as one. Importing transformers' table takes
about 2 s, which `ONLY_RENAMED` and `TABLE` spare the common models. A rename alone in a model type of
`ONLY_RENAMED` is not followed: a filter written for a name only transformers 5 has (a multimodal
checkpoint's `model.language_model.` for `language_model.model.`) matches the names as stored here.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from .. import spec
from ..errors import AdaptkitError
from .slices import Job

#: A per-expert tensor: a model with them is read through its table whatever its type (mergekit's architecture
#: files for MoE models list the stacked names; `ONLY_RENAMED` is for models without).
EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass
class Group:
    """Checkpoint tensors that are one tensor in transformers 5's layout: `members[p][e]` is source pattern p's
    tensor of expert e (`[[name]]`: a tensor renamed only), stacked on a new first axis per pattern and the
    stacks concatenated on axis `axis` (not `stacked`: one tensor a pattern, the tensors concatenated, `sizes`
    long on that axis where not alike); or, with `part` (i, k), the i-th of k equal chunks of its one member's
    rows (a `qkv` split into q, k and v)."""

    name: str
    members: list[list[str]]
    stacked: bool = False
    axis: int = 1
    part: tuple[int, int] | None = None
    sizes: tuple[int, ...] = ()

    def build(self, parts: list[list[torch.Tensor]]) -> torch.Tensor:
        if self.part is not None:
            i, k = self.part
            return parts[0][0].chunk(k)[i]
        stacks = [torch.stack(p) for p in parts] if self.stacked else [p[0] for p in parts]
        return torch.cat(stacks, dim=self.axis) if len(stacks) > 1 else stacks[0]

    def split(self, fused: torch.Tensor) -> list[tuple[str, torch.Tensor, int]]:
        """Each member's part of a tensor built by `build` (views), and the row of the member it starts at."""
        if self.part is not None or (len(self.members) == 1 and not self.stacked):  # (a part, a tensor renamed)
            return [(self.members[0][0], fused, self.part[0] * fused.shape[0] if self.part else 0)]
        out = []
        for i, pattern in enumerate(self.members):
            block = fused.narrow(self.axis, *self._span(i, fused.shape[self.axis]))
            out += [(m, block[e] if self.stacked else block, 0) for e, m in enumerate(pattern)]
        return out

    def expert_part(self, one: torch.Tensor, i: int) -> torch.Tensor:
        """Pattern i's part of one expert's slice of a stacked group's tensor (its stacking axis gone): a
        merged LoRA's ΔP, one expert at a time (`sources.py`)."""
        return one if len(self.members) == 1 else one.narrow(self.axis - 1, *self._span(i, one.shape[self.axis - 1]))

    def _span(self, i: int, total: int) -> tuple[int, int]:
        """(start, length) of pattern i on the concatenation axis of `total` entries (stacks are alike)."""
        if self.sizes:
            return sum(self.sizes[:i]), self.sizes[i]
        return i * (total // len(self.members)), total // len(self.members)

    def shape(self, member: tuple[int, ...]) -> tuple[int, ...]:
        if self.part is not None:
            return (member[0] // self.part[1], *member[1:])
        stacked = (len(self.members[0]), *member) if self.stacked else member
        if len(self.members) == 1:
            return stacked
        size = sum(self.sizes) if self.sizes else stacked[self.axis] * len(self.members)
        return stacked[:self.axis] + (size,) + stacked[self.axis + 1:]


class FusedSource:
    """An input read in transformers 5's layout: a group's name gives the group built from its members; the
    rest is the input's own (`ModelSource`)."""

    def __init__(self, source: Any, groups: dict[str, Group]):
        self.source, self.groups = source, groups

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.source, attr)

    def info(self, name: str):
        info = self.source.info(self.groups[name].members[0][0])
        return replace(info, name=name, shape=self.groups[name].shape(tuple(info.shape)))

    def stored(self, name: str) -> str | None:
        return name if all(self.source.stored(m) for p in self.groups[name].members for m in p) else None

    def has_deltas(self, name: str) -> bool:
        return any(self.source.has_deltas(m) for p in self.groups[name].members for m in p)

    def get(self, name: str, *, float32: bool = True, rows=None) -> torch.Tensor:
        group = self.groups[name]
        return group.build([[self.source.get(m, float32=float32) for m in p] for p in group.members])


def fuse(plan: Any) -> tuple[list[str], dict[str, Job], dict[str, Group]]:
    """The plan's output names with each group of checkpoint tensors that transformers 5 fuses, splits or renames
    (at its first member's place), that group's job and the groups by name; the names unchanged where that
    changes no number (an elementwise method without filters), or where mergekit reads the names as stored
    (a model type of `ONLY_RENAMED` without per-expert tensors: the module docstring)."""
    names, recipe = plan.names, plan.recipe
    filtered = _has_filter(recipe.source)
    if spec.option(plan.method, "elementwise") and not filtered:
        return names, {}, {}
    config = (plan.donor if plan.jobs else plan.base or plan.inputs[0]).config or {}
    experts = any(EXPERT.search(n) for n in names)
    if not experts and config.get("model_type") in ONLY_RENAMED:
        return names, {}, {}

    def warn(name: str, there: str) -> None:
        why = " and ".join(([] if spec.option(plan.method, "elementwise") else
                            ["each statistic covers all experts at once" if experts else
                             "each statistic covers a tensor as transformers 5 builds it"])
                           + (["its filters match the names there"] if filtered else []))
        what = "these experts" if experts else "this model"
        warnings.warn(f"{config.get('model_type')}: mergekit 0.1.5 merges {what} in transformers 5's layout ('{name}' "
                      f"read as '{there}'), where {why}: its numbers differ from these. adaptkit merges and writes "
                      "the checkpoint's tensors as stored")

    steps = conversion_steps(config.get("model_type"))
    groups = converted_groups(names, steps, warn)
    if not groups:
        return names, {}, {}
    jobs = {}
    for name, group in groups.items():
        member_jobs = [[plan.job(m) for m in p] for p in group.members]
        inputs = [[s for s, _ in j.sources] for p in member_jobs for j in p]
        if any(i != inputs[0] for i in inputs):  # (`tensors: union` where an input lacks some experts)
            warn(group.members[0][0], name)
            return names, {}, {}
        first = member_jobs[0][0]
        sources = [_reading(first.sources[k], group, member_jobs, k, steps) for k in range(len(first.sources))]
        group.sizes = sources[0][0].groups[sources[0][1]].sizes  # (alike in every input: the plan compares members)
        jobs[name] = Job(sources[1:] if first.base else sources, sources[0] if first.base else None, first.t,
                         first.own, first.shared)
    place: dict[str, list[Group]] = {}  # (a split tensor is a member of each of its parts)
    for g in groups.values():
        for m in {m for p in g.members for m in p}:
            place.setdefault(m, []).append(g)
    # each group once, where its first member was
    merged = []
    for n in names:
        merged += [g.name for g in place[n] if n == g.members[0][0]] if n in place else [n]
    return merged, jobs, groups


def _reading(source: tuple[Any, str], group: Group, member_jobs: list[list[Job]], k: int,
             steps: tuple[Step, ...]) -> tuple[FusedSource, str]:
    """A job's source k, reading the group from the tensors it gives each member (with slices, another layer's),
    under the name the same steps give those tensors there."""
    stored = next(c.name for c in _convert(source[1], steps) if c.part == group.part)
    theirs = Group(stored, [[j.sources[k][1] for j in p] for p in member_jobs], group.stacked, group.axis, group.part)
    shapes = {m: tuple(source[0].info(m).shape) for p in theirs.members for m in p}
    first = theirs.members[0][0]
    joined = not group.stacked and len(theirs.members) > 1  # (alike but on the axis they are concatenated on)
    if joined and all(len(shape) > group.axis for shape in shapes.values()):
        theirs.sizes = tuple(shapes[p[0]][group.axis] for p in theirs.members)
        shapes = {m: shape[:group.axis] + shape[group.axis + 1:] for m, shape in shapes.items()}
    if odd := next((m for m, shape in shapes.items() if shape != shapes[first]), None):
        shape = [tuple(source[0].info(m).shape) for m in (odd, first)]
        raise AdaptkitError(f"'{odd}' of {source[0].ref} has shape {shape[0]} where '{first}' has {shape[1]}: " + (
            "a layer's experts must be alike (transformers stacks them)" if group.stacked
            else f"transformers cannot concatenate them into '{stored}'"))
    if group.part and (not shapes[first] or shapes[first][0] % group.part[1]):
        raise AdaptkitError(f"'{first}' of {source[0].ref} has shape {shapes[first]}: transformers splits it into "
                            f"{group.part[1]} equal parts on its rows")
    return FusedSource(source[0], {stored: theirs}), stored


@dataclass(frozen=True)
class Step:
    """One step of transformers 5's conversion table: a rename (`sources` -> `target`), or per-expert tensors
    (`*` the expert) stacked into `target`, the stacks of several sources concatenated on `axis` (`join`: one
    tensor of each source, concatenated), or (`parts`) one tensor split into equal chunks of its rows named by
    those targets; `rename`: transformers' own matching, where the step is read from its table (None:
    whole-pattern replacement)."""

    sources: tuple[str, ...]
    target: str
    stack: bool = False
    axis: int = 0
    rename: Any = None
    followed: bool = True  # (False: a step other than these, which a merge does not follow)
    parts: tuple[str, ...] = ()
    join: bool = False

    def apply(self, key: str) -> tuple[str, str | None]:
        """(the key renamed, the source pattern that matched) or (key, None)."""
        if self.rename is not None:
            return self.rename(key)
        for pattern in self.sources:
            if found := re.search(re.escape(pattern).replace(r"\*", r"[^.]*"), key):
                return key[:found.start()] + self.target + key[found.end():], pattern
        return key, None


class Converted(NamedTuple):
    """A checkpoint tensor's name in transformers 5's layout, (source pattern, expert) where a step stacks it
    ((source pattern, None) where one joins it with `joined` − 1 others), the concatenation axis, whether every
    step it went through is one a merge follows, and (i, k) where a step splits it into k parts (this is part i)."""

    name: str
    slot: tuple[int, int | None] | None = None
    axis: int = 0
    followed: bool = True
    part: tuple[int, int] | None = None
    joined: int = 0


def _experts(gate: str, up: str, down: str, where: str = "mlp.experts") -> tuple[Step, ...]:
    return (Step((f"{where}.*.{gate}.weight", f"{where}.*.{up}.weight"), f"{where}.gate_up_proj", True, 1),
            Step((f"{where}.*.{down}.weight",), f"{where}.down_proj", True, 0))


_BLOCK_SPARSE = (Step((".block_sparse_moe.",), ".mlp."),) + _experts("w1", "w3", "w2", ".experts")
#: transformers 5's conversion table for the MoE checkpoints most merged, written out so that merging them
#: does not import it (`transformers.conversion_mapping` takes about 2 s: on a 106M Mixtral, slerp's work was
#: 2.0 s against mergekit's 1.0). tests/test_merge_output.py checks each against transformers' own table;
#: another model type with per-expert tensors reads transformers' table.
TABLE: dict[str, tuple[Step, ...]] = {
    "mixtral": _BLOCK_SPARSE, "minimax": _BLOCK_SPARSE,
    **dict.fromkeys(("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe"),
                    _experts("gate_proj", "up_proj", "down_proj")),
    "jamba": _experts("gate_proj", "up_proj", "down_proj", "feed_forward.experts"),
    "lfm2_moe": _experts("w1", "w3", "w2", "feed_forward.experts"),
}


#: Model types whose tensors mergekit 0.1.5 reads as stored where they have no per-expert tensors: transformers 5's
#: table has no steps for them, or only renames and mergekit's architecture file lists the stored names (Gemma-3,
#: Mistral-3 and Granite-4 with their `language_model.`, `block_sparse_moe.` names); a merge of one reads nothing
#: from the table (importing it takes about 2 s). Llava, PaliGemma, GraniteMoE, … are not here: mergekit infers them
#: from transformers 5, renamed. tests/test_merge_output.py checks each against transformers' table.
ONLY_RENAMED = frozenset({
    "apertus", "arcee", "baichuan", "bamba", "bert", "bloom", "chatglm", "codegen", "cohere", "cohere2", "dbrx",
    "distilbert", "ernie4_5", "exaone", "exaone4", "falcon", "falcon_h1", "gemma", "gemma2", "gemma3",
    "gemma3_text", "gemma3n", "glm", "glm4", "glm4v", "gpt2", "gpt_bigcode", "gpt_neox", "gpt_oss", "gptj",
    "granite", "granitemoehybrid", "helium", "hunyuan_v1_dense", "internlm2", "jais", "jetmoe", "lfm2", "llama",
    "llama4", "llama4_text", "mamba", "mamba2", "ministral", "ministral3", "mistral", "mistral3", "mistral4",
    "modernbert", "mpt", "nemotron", "olmo", "olmo2", "olmo3", "opt", "persimmon", "phi", "phi3", "qwen", "qwen2",
    "qwen2_5_vl", "qwen2_vl", "qwen3", "qwen3_5", "qwen3_5_moe", "qwen3_vl", "recurrent_gemma", "roberta",
    "seed_oss", "smollm3", "solar", "stablelm", "starcoder2", "t5", "whisper", "xlm-roberta", "zamba2"})


def conversion_steps(model_type: str | None) -> tuple[Step, ...]:
    """transformers 5's conversion steps for a model type (`TABLE`, else its own table; () without one)."""
    if model_type in TABLE:
        return TABLE[model_type]
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, WeightConverter
        transforms = get_checkpoint_conversion_mapping(model_type) or []
    except (ImportError, KeyError, ValueError):  # (a transformers without the table: mergekit 0.1.5 needs it)
        return ()
    steps = []
    for t in transforms:
        ops = [(type(o), getattr(o, "dim", None)) for o in getattr(t, "operations", None) or []]
        if not isinstance(t, WeightConverter):
            steps.append(Step(tuple(t.source_patterns), "", rename=t.rename_source_key))
        elif ops == [(Chunk, 0)] and t.operations[0].num_shards_attribute is None:  # (else the parts are the config's)
            steps.append(Step(tuple(t.source_patterns), "", rename=t.rename_source_key, parts=tuple(t.target_patterns)))
        elif [o for o, _ in ops] == [Concatenate] and t.operations[0].num_shards_attribute is None:
            steps.append(Step(tuple(t.source_patterns), "", axis=ops[0][1], rename=t.rename_source_key, join=True))
        else:
            followed = ops[:1] == [(MergeModulelist, 0)] and len(ops) <= 2 and all(o is Concatenate for o, _ in ops[1:])
            steps.append(Step(tuple(t.source_patterns), "", True, ops[-1][1] if len(ops) > 1 else 0,
                              t.rename_source_key, followed))
    return tuple(steps)


def _convert(name: str, steps: tuple[Step, ...]) -> list[Converted]:
    """What transformers 5's conversion `steps` make of a checkpoint tensor: one name, or one for each part a
    step splits it into (each part going on through the steps after that one)."""
    fused, slot, axis, joined = name, None, 0, 0
    for j, step in enumerate(steps):
        renamed, pattern = step.apply(fused)
        if pattern is None:
            continue
        if step.parts:  # (the parts' names as mergekit's `_expanded_target_keys` makes them)
            head, found, tail = renamed.partition(step.parts[0])
            if not found or slot is not None:
                return [Converted(renamed, followed=False)]
            return [c._replace(part=(i, len(step.parts)), followed=c.followed and c.part is None and c.slot is None)
                    for i, target in enumerate(step.parts) for c in _convert(head + target + tail, steps[j + 1:])]
        if step.join:
            if not step.followed or slot is not None:
                return [Converted(renamed, followed=False)]
            slot, axis, joined = (step.sources.index(pattern), None), step.axis, len(step.sources)
        if step.stack:
            expert = re.search(re.escape(pattern).replace(r"\*", r"([^.]*)"), fused)
            if not step.followed or expert is None or not expert.group(1).isdigit():
                return [Converted(renamed, followed=False)]
            slot, axis = (step.sources.index(pattern), int(expert.group(1))), step.axis
        fused = renamed
    return [Converted(fused, slot, axis, joined=joined)]


def converted_groups(names: list[str], steps: tuple[Step, ...], warn) -> dict[str, Group]:
    """The groups transformers 5's conversion `steps` make of `names`, by their name there; {} after
    `warn(name, name there)` where a step is one adaptkit does not follow or an expert or joined tensor is
    missing (mergekit's numbers then differ, as the warning says)."""
    found: dict[str, dict] = {}  # name there -> {(source pattern, expert or None) or None: checkpoint name}
    joins: dict[str, tuple[int, int]] = {}  # name there -> (its axis, how many tensors a step concatenates there)
    parts: dict[str, tuple[str, tuple[int, int]]] = {}  # name there -> (checkpoint name, (i, k))
    for name in names:
        for fused, slot, axis, followed, part, joined in _convert(name, steps):
            if fused == name:  # (mergekit reads a tensor as stored where it has its name: a step in place, a
                continue  # transpose or a permutation, is never applied, mergekit's `io/tasks.py`)
            if not followed or fused in parts or (part and fused in found):
                warn(name, fused)
                return {}
            if part:
                parts[fused] = (name, part)
                continue
            found.setdefault(fused, {})[slot] = name
            joins[fused] = axis, joined
    groups = {fused: Group(fused, [[name]], part=part) for fused, (name, part) in parts.items()}
    for fused, members in found.items():
        if None in members:  # renamed only: one tensor
            if len(members) > 1:
                warn(members[None], fused)
                return {}
            groups[fused] = Group(fused, [[members[None]]])
            continue
        (patterns, experts), (axis, joined) = (sorted({p for p, _ in members}), {e for _, e in members}), joins[fused]
        if experts == {None}:  # one tensor of each source, concatenated
            if len(patterns) != joined:
                warn(next(iter(members.values())), fused)  # (a source missing)
                return {}
            groups[fused] = Group(fused, [[members[p, None]] for p in patterns], False, axis)
            continue
        complete = None not in experts and sorted(experts) == list(range(len(experts)))
        if not complete or len(members) != len(patterns) * len(experts):
            warn(next(iter(members.values())), fused)  # (an expert missing)
            return {}
        groups[fused] = Group(fused, [[members[p, e] for e in sorted(experts)] for p in patterns], True, axis)
    return groups


def _has_filter(node: Any) -> bool:
    if isinstance(node, dict):
        return "filter" in node or any(_has_filter(v) for v in node.values())
    return isinstance(node, list) and any(_has_filter(v) for v in node)
