"""TensorRT optimization profiles as input shapes, and the shapes of one forward: plain logic.

Used by `gptexport check` (profile coverage), `gptexport build` (the profiles it builds), the
TensorRT runner (which profile a forward falls in) and ONNX Runtime's TensorRT provider (its one
spanning profile). Runtime-side: it imports neither TensorRT nor the engine builder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import GPTConfig, IOSpec
from .errors import GptExportError, UsageError


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int


@dataclass
class Profile:
    """One TensorRT optimization profile: a (min, opt, max) range for every dynamic dim."""

    name: str
    dims: dict[str, DimRange] = field(default_factory=dict)

    def shapes(self, spec: IOSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape of every input whose shape is not fixed."""
        out = {}
        for t in spec.inputs:
            if all(isinstance(d, int) for d in t.shape):
                continue
            out[t.name] = tuple(
                tuple(d if isinstance(d, int) else getattr(self.dims[d], which) for d in t.shape)
                for which in ("min", "opt", "max")
            )
        return out


def profiles(config: GPTConfig, max_batch: int = 1, opt_seq: int | None = None) -> list[Profile]:
    """Prefill (past 0, any prompt length) and decode (one token, any cache length) profiles."""
    T = config.block_size
    opt_seq = min(opt_seq or min(64, T), T)
    batch = DimRange(1, max_batch, max_batch)
    prefill = Profile("prefill", {
        "batch": batch,
        "sequence": DimRange(1, opt_seq, T),
        "past_sequence": DimRange(0, 0, 0),
        "num_logits": DimRange(1, 1, T),
    })
    decode = Profile("decode", {
        "batch": batch,
        "sequence": DimRange(1, 1, 1),
        "past_sequence": DimRange(1, T // 2 if T > 1 else 1, T),
        "num_logits": DimRange(1, 1, 1),
    })
    return [prefill, decode]


Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)


@dataclass(frozen=True)
class ProfileShapes:
    """One optimization profile as TensorRT takes it: (min, opt, max) shape of each dynamic input."""

    name: str
    shapes: dict[str, ShapeRange]

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                                              for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "ProfileShapes":
        return cls(d["name"], {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
                               for k, v in d["shapes"].items()})

    def contains(self, shapes: dict[str, Shape]) -> bool:
        """Whether every given input shape lies within this profile's range."""
        for name, shape in shapes.items():
            if name not in self.shapes:
                continue  # a fixed-shape input
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
        return True


def profile_shapes(config: GPTConfig, spec: IOSpec, max_batch: int = 1,
                   opt_seq: int | None = None) -> list[ProfileShapes]:
    """The prefill and decode profiles of config.profiles, as input shapes, checked for consistency."""
    if max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {max_batch}")
    if opt_seq is not None and not 1 <= opt_seq <= config.block_size:
        raise UsageError(f"--opt-seq must be in 1..{config.block_size} (block_size), got {opt_seq}")
    result = [ProfileShapes(p.name, p.shapes(spec)) for p in profiles(config, max_batch, opt_seq)]
    problems = profile_problems(config, spec, result)
    if problems:
        raise GptExportError(f"inconsistent optimization profiles: {problems[0]}")
    return result


def profile_problems(config: GPTConfig, spec: IOSpec, profs: list[ProfileShapes]) -> list[str]:
    """What would make TensorRT refuse these profiles, or the graph fail inside them ([] if none).

    Every cache input must have the same range as the others (one KV layout for all layers), the
    batch dim must agree across inputs, and positions must stay within block_size (wpe's rows).
    """
    dynamic = [t for t in spec.inputs if not all(isinstance(d, int) for d in t.shape)]
    problems = []
    for p in profs:
        own = _range_problems(p, dynamic)
        problems += own or _consistency_problems(config, spec, p)
    return problems


def _range_problems(p: ProfileShapes, dynamic: list) -> list[str]:
    problems = []
    for t in dynamic:
        if t.name not in p.shapes:
            problems.append(f"{p.name}: no range for dynamic input {t.name}")
            continue
        lo, opt, hi = p.shapes[t.name]
        if not len(lo) == len(opt) == len(hi) == len(t.shape):
            problems.append(f"{p.name}: {t.name} has rank {len(t.shape)}, its range does not")
        elif any(not 0 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
            problems.append(f"{p.name}: {t.name} needs 0 <= min <= opt <= max, got {lo} {opt} {hi}")
        elif any(isinstance(d, int) and not a == c == d for d, a, c in zip(t.shape, lo, hi)):
            problems.append(f"{p.name}: {t.name} has fixed dims {t.shape}, its range is {lo}..{hi}")
    return problems


def _consistency_problems(config: GPTConfig, spec: IOSpec, p: ProfileShapes) -> list[str]:
    problems = []
    past = [p.shapes[n] for n in spec.past_names]
    ids, pos = p.shapes["input_ids"], p.shapes["logit_positions"]
    if any(r != past[0] for r in past):
        problems.append(f"{p.name}: the past_key/past_value inputs have different ranges")
    if past and any(ids[k][0] != past[0][k][0] for k in range(3)):
        problems.append(f"{p.name}: input_ids and the cache inputs have different batch ranges")
    lengths = p.shapes.get("past_length")
    if lengths and any(ids[k][0] != lengths[k][0] for k in range(3)):
        problems.append(f"{p.name}: input_ids and past_length have different batch ranges")
    if ids[0][0] < 1:
        problems.append(f"{p.name}: batch must be >= 1")
    if ids[0][1] < 1 or pos[0][0] < 1:
        problems.append(f"{p.name}: sequence and num_logits must be >= 1")
    if ids[2][1] > config.block_size or (past and past[0][2][2] > config.block_size):
        problems.append(f"{p.name}: sequence and past_sequence must be <= block_size {config.block_size}")
    if pos[2][0] > ids[2][1]:
        problems.append(f"{p.name}: num_logits max {pos[2][0]} exceeds sequence max {ids[2][1]}")
    return problems


def select_profile(profs: list[ProfileShapes], shapes: dict[str, Shape]) -> int | None:
    """Index of the first profile whose ranges hold every input shape, or None."""
    return next((i for i, p in enumerate(profs) if p.contains(shapes)), None)


def describe_profiles(profs: list[ProfileShapes]) -> str:
    """e.g. `prefill (batch x sequence 1x1..4x1024, past_sequence 0..0), decode (...)`, for messages."""
    parts = []
    for p in profs:
        ids = p.shapes.get("input_ids")
        past = next((v for k, v in p.shapes.items() if k.startswith("past_")), None)
        text = f"batch x sequence {_dims(ids[0])}..{_dims(ids[2])}" if ids else ""
        if past:
            text += f", past_sequence {past[0][2]}..{past[2][2]}"
        parts.append(f"{p.name} ({text})")
    return ", ".join(parts)


def union_profile(profs: list[ProfileShapes], opt_from: ProfileShapes | None = None) -> ProfileShapes:
    """One profile covering them all, tuned for `opt_from`'s opt shapes (default: the last, decode).

    For ONNX Runtime's TensorRT provider, whose execution context stays on its first profile.
    """
    opt_from = opt_from or profs[-1]
    shapes = {}
    for name in profs[0].shapes:
        ranges = [p.shapes[name] for p in profs]
        lo = tuple(min(r[0][k] for r in ranges) for k in range(len(ranges[0][0])))
        hi = tuple(max(r[2][k] for r in ranges) for k in range(len(ranges[0][0])))
        opt = tuple(min(max(a, o), b) for a, o, b in zip(lo, opt_from.shapes[name][1], hi))
        shapes[name] = (lo, opt, hi)
    return ProfileShapes("+".join(p.name for p in profs), shapes)


def ort_profile_options(prof: ProfileShapes) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes in ONNX Runtime's "name:1x2x3,name2:..." format."""
    return {f"trt_profile_{which}_shapes": ",".join(f"{name}:{_dims(r[k])}" for name, r in prof.shapes.items())
            for k, which in enumerate(("min", "opt", "max"))}


def step_shapes(spec: IOSpec, batch: int, steps: int, past: int, num_logits: int) -> dict[str, Shape]:
    """Every input's shape for one forward: `steps` new tokens after a past buffer of `past` slots."""
    dims = {"batch": batch, "sequence": steps, "past_sequence": past, "num_logits": num_logits}
    return {t.name: tuple(d if isinstance(d, int) else dims[d] for d in t.shape) for t in spec.inputs}


def output_shapes(spec: IOSpec, batch: int, steps: int, num_logits: int) -> dict[str, Shape]:
    dims = {"batch": batch, "sequence": steps, "num_logits": num_logits}
    return {t.name: tuple(d if isinstance(d, int) else dims[d] for d in t.shape) for t in spec.outputs}


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)

