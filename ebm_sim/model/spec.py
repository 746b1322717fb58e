"""A short, readable architecture grammar, and the same description from a TOML file.

    spec   := input ("," block)*
    input  := N | CxHxW                      e.g. 784  or  3x32x32
    block  := N                              a dense layer of N units (so "784,512,10" is today's --layers)
            | "dense" N
            | "conv" C option*               a conv layer of C channels; options, in any order:
                  kN      kernel N (default 3)      sN  stride N (default 1)      pN  zero padding N (default 0)
                  maxpool | avgpool          2x2 pooling inside the interaction term
            | "readout" N                    a softmax readout of N classes (last block only; cost: cross-entropy)

Without a readout the last layer is the output and the cost is the squared error. Whitespace is free; blocks are
separated by commas (or newlines). The Laborieux et al. 2021 CIFAR-10 network:

    3x32x32, conv 128 k3 p1 maxpool, conv 256 k3 p1 maxpool, conv 512 k3 p1 maxpool, conv 512 k3 p0 maxpool, readout 10

A TOML file holds the same blocks: ``input = "3x32x32"``, ``blocks = ["conv 128 k3 p1 maxpool", ..., "readout 10"]``
and optionally ``activation = "hard_sigmoid_half"``. Errors quote the spec and point at the offending token.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

POOL_WORDS = {"maxpool": "max", "avgpool": "avg"}
SIZE_WORDS = {"conv": "channels", "dense": "units", "readout": "classes"}


class SpecError(ValueError):
    """An architecture spec that does not parse or does not fit: the message points at the token."""


@dataclass(frozen=True)
class Block:
    """One layer after the input: kind "dense" (size = units), "conv" (size = channels) or "readout" (classes)."""

    kind: str
    size: int
    kernel: int = 3
    stride: int = 1
    padding: int = 0
    pool: str | None = None

    def text(self) -> str:
        if self.kind != "conv":
            return f"{self.kind} {self.size}"
        words = [f"conv {self.size}", f"k{self.kernel}"]
        words += [f"s{self.stride}"] if self.stride != 1 else []
        words += [f"p{self.padding}"] if self.padding else []
        words += [f"{self.pool}pool"] if self.pool else []
        return " ".join(words)


@dataclass(frozen=True)
class Architecture:
    """A parsed spec: the input shape and the blocks, in order. ``activation`` is None unless a file sets it."""

    input_shape: tuple
    blocks: tuple = field(default_factory=tuple)
    activation: str | None = None

    @property
    def readout(self) -> int | None:
        return self.blocks[-1].size if self.blocks and self.blocks[-1].kind == "readout" else None

    def text(self) -> str:
        """The canonical spec string (parses back to an equal Architecture)."""
        return ", ".join(["x".join(map(str, self.input_shape))] + [b.text() for b in self.blocks])


def _fail(text: str, start: int, end: int, message: str):
    caret = " " * start + "^" * max(1, end - start)
    raise SpecError(f"{message}\n    {text}\n    {caret}")




def parse(text: str) -> Architecture:
    """Parse a spec string (see the module docstring) into an Architecture; SpecError points at a bad token."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError("an architecture spec is empty: give e.g. '784,512,10' or '3x32x32, conv 64 k3 p1 maxpool, "
                        "readout 10'")
    items = [(m.start(), m.group()) for m in re.finditer(r"[^,\n]+", text)]
    items = [(start, item) for start, item in items if item.strip()]
    if len(items) < 2:
        raise SpecError(f"an architecture needs an input and at least one more layer: {text!r}")
    start, first = items[0]
    offset = start + len(first) - len(first.lstrip())
    shape_match = re.fullmatch(r"\s*(\d+(?:\s*x\s*\d+)*)\s*", first)
    if not shape_match:
        _fail(text, offset, start + len(first.rstrip()), "the first item must be the input shape, N or CxHxW")
    input_shape = tuple(int(v) for v in re.split(r"\s*x\s*", shape_match.group(1)))
    if len(input_shape) not in (1, 3) or min(input_shape) < 1:
        _fail(text, offset, start + len(first.rstrip()),
              f"the input shape must be N or CxHxW with positive sizes, got {'x'.join(map(str, input_shape))}")
    blocks = []
    for index, (start, item) in enumerate(items[1:], start=1):
        tokens = [(start + m.start(), m.group()) for m in re.finditer(r"\S+", item)]
        blocks.append(_parse_block(text, tokens, last=index == len(items) - 1))
    return Architecture(input_shape, tuple(blocks))


def _parse_block(text, tokens, last: bool) -> Block:
    (start, word), rest = tokens[0], tokens[1:]
    if word.isdigit():
        if rest:
            _fail(text, rest[0][0], rest[-1][0] + len(rest[-1][1]),
                  "a bare number is a dense layer and takes no options")
        return Block("dense", _checked_int(text, start, word, "a layer size", 1))
    kind = word.lower()
    if kind not in ("dense", "conv", "readout"):
        _fail(text, start, start + len(word),
              f"unknown layer {word!r}: expected a number, 'dense', 'conv' or 'readout'")
    if not rest or not rest[0][1].isdigit():
        where = rest[0] if rest else (start, word)
        _fail(text, where[0], where[0] + len(where[1]),
              f"'{kind}' needs its size next ({SIZE_WORDS[kind]})")
    size = _checked_int(text, rest[0][0], rest[0][1], f"the {kind} size", 1)
    options = rest[1:]
    if kind == "readout" and not last:
        _fail(text, start, start + len(word), "a readout must be the last block")
    if kind != "conv":
        if options:
            _fail(text, options[0][0], options[-1][0] + len(options[-1][1]), f"'{kind}' takes no options")
        return Block(kind, size)
    settings = {}
    for position, token in options:
        lowered = token.lower()
        match = re.fullmatch(r"([ksp])(\d+)", lowered)
        if match:
            name = {"k": "kernel", "s": "stride", "p": "padding"}[match.group(1)]
            key = name
            value = _checked_int(text, position, token, f"the {name}", 0 if name == "padding" else 1, skip=1)
        elif lowered in POOL_WORDS:
            key, value = "pool", POOL_WORDS[lowered]
        else:
            _fail(text, position, position + len(token),
                  f"unknown conv option {token!r}: expected kN (kernel), sN (stride), pN (padding), maxpool or avgpool")
        if key in settings:
            _fail(text, position, position + len(token), f"the {key} is given twice")
        settings[key] = value
    return Block("conv", size, **settings)


def _checked_int(text, start, token, what, minimum, skip=0):
    digits = token[skip:]
    if not digits.isdigit():
        _fail(text, start, start + len(token), f"{what} must be an integer, got {token!r}")
    number = int(digits)
    if number < minimum:
        _fail(text, start, start + len(token), f"{what} must be >= {minimum}, got {number}")
    return number


def load(source) -> Architecture:
    """An Architecture from a spec string, a ``.toml`` file path, or an Architecture (returned as is)."""
    if isinstance(source, Architecture):
        return source
    if isinstance(source, (list, tuple)):  # layer sizes, as --layers gives them
        return parse(",".join(str(int(n)) for n in source))
    text = str(source)
    if text.endswith(".toml"):
        return _load_toml(Path(text))
    return parse(text)


def _load_toml(path: Path) -> Architecture:
    import tomllib

    if not path.is_file():
        raise SpecError(f"architecture file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SpecError(f"{path} is not valid TOML: {error}") from None
    unknown = set(data) - {"input", "blocks", "activation"}
    if unknown:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)}; an architecture file has input, blocks, activation")
    if not isinstance(data.get("input"), (str, int)) or not isinstance(data.get("blocks"), list) or not all(
            isinstance(b, (str, int)) for b in data.get("blocks", [])):
        raise SpecError(f"{path}: needs input = \"CxHxW\" (or N) and blocks = [\"conv 64 k3 p1 maxpool\", ...]")
    try:
        architecture = parse(", ".join(str(item) for item in [data["input"], *data["blocks"]]))
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None
    activation = data.get("activation")
    if activation is not None and not isinstance(activation, str):
        raise SpecError(f"{path}: activation must be a string, got {activation!r}")
    return Architecture(architecture.input_shape, architecture.blocks, activation)
