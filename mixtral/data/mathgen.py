"""Generates school-level mathematics questions with exact, checkable answers.

Reference: Saxton et al., "Analysing Mathematical Reasoning Abilities of Neural Models" (2019), the
DeepMind Mathematics dataset that the Mixtral paper evaluates on as a Pile subset. The question
phrasing imitates its modules (arithmetic, algebra, polynomials, calculus, numbers, comparison,
measurement, probability); the generator is ours, because the `mathematics_dataset` package no
longer imports with current sympy, and a later issue needs every answer exact.

Contract: item `i` of seed `s` depends only on `(s, i)` (its own `random.Random`), so
`generate(10, s)[:5] == generate(5, s)` and any item can be regenerated alone. Module `i % len(modules)`
is used for item `i`, so every module is equally represented. Answers are exact: integers,
reduced fractions `p/q`, terminating decimals, `True`/`False`, comma-separated lists, or
polynomials written as `3*x**2 - x + 7` (highest degree first).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from itertools import count

from mixtral.errors import DataError

_VARS = "abcdfghjklmnopqrstuvwxyz"  # no 'e' and 'i', which read as constants
_FUNCS = "fghjklmnpqrsuvw"


@dataclass(frozen=True)
class MathItem:
    """One question with its exact answer; `module` names the generator that made it."""

    module: str
    question: str
    answer: str

    @property
    def text(self) -> str:
        return f"Question: {self.question}\nAnswer: {self.answer}"


# ---------------------------------------------------------------- formatting


def fmt_number(x: int | Fraction | Decimal) -> str:
    """`7`, `-4/3` or `2.25`: integers plainly, fractions reduced, decimals without trailing zeros."""
    if isinstance(x, Decimal):
        return format(x.normalize(), "f") if x != 0 else "0"
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def fmt_poly(coeffs: Sequence[int], var: str) -> str:
    """Polynomial with `coeffs[k]` the coefficient of `var**k`, highest degree first."""
    terms = []
    for k in range(len(coeffs) - 1, -1, -1):
        c = coeffs[k]
        if c == 0:
            continue
        power = "" if k == 0 else var if k == 1 else f"{var}**{k}"
        body = str(abs(c)) if k == 0 else (power if abs(c) == 1 else f"{abs(c)}*{power}")
        sign = ("-" if c < 0 else "") if not terms else (" - " if c < 0 else " + ")
        terms.append(sign + body)
    return "".join(terms) or "0"


def _poly_mul(p: Sequence[int], q: Sequence[int]) -> list[int]:
    out = [0] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def _poly_eval(coeffs: Sequence[int], x: int) -> int:
    return sum(c * x**k for k, c in enumerate(coeffs))


def _nonzero(rng: random.Random, lo: int, hi: int) -> int:
    return rng.choice([v for v in range(lo, hi + 1) if v != 0])


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _rational(rng: random.Random) -> Fraction | Decimal:
    """A number to compare or sort: an integer, a one- or two-place decimal, or a fraction."""
    kind = rng.randrange(3)
    if kind == 0:
        return Fraction(rng.randint(-50, 50))
    if kind == 1:
        return Decimal(rng.randint(-500, 500)) / Decimal(10 ** rng.randint(1, 2))
    return Fraction(rng.randint(-30, 30), rng.randint(2, 9))


# ---------------------------------------------------------------- modules


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*/d")
    if op == "d":  # decimals, as in DM's add_or_sub in base 10 with decimals
        a, b = (Decimal(rng.randint(-9999, 9999)) / 100 for _ in range(2))
        if rng.random() < 0.5:
            text, value = rng.choice(["What is {a} + {b}?", "Add {a} and {b}."]), a + b
        else:
            text, value = rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}."]), a - b
        return text.format(a=a, b=b), fmt_number(value)
    if op == "/":
        b, q = _nonzero(rng, -40, 40), rng.randint(-300, 300)
        text = rng.choice(["Divide {a} by {b}.", "What is {a} divided by {b}?", "Calculate {a}/{b}."])
        return text.format(a=b * q, b=b), str(q)
    hi = 999 if op in "+-" else 99
    a, b = rng.randint(-hi, hi), rng.randint(-hi, hi)
    templates = {
        "+": ["What is {a} + {b}?", "Calculate {a} + {b}.", "Sum {a} and {b}."],
        "-": ["What is {a} - {b}?", "Calculate {a} - {b}.", "Subtract {b} from {a}."],
        "*": ["What is {a} times {b}?", "Multiply {a} and {b}.", "Calculate {a}*{b}."],
    }
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return rng.choice(templates[op]).format(a=a, b=b), str(value)


def _expression(rng: random.Random, depth: int) -> tuple[str, Fraction, str]:
    """A random expression over small nonzero integers: its text, exact value and top operator.

    Brackets go where precedence or non-associativity needs them, so the text reads back (with
    Python's precedence) to the value returned. Negative literals are always bracketed.
    """
    if depth == 0 or rng.random() < 0.3:
        v = _nonzero(rng, -20, 20)
        return (f"({v})" if v < 0 else str(v)), Fraction(v), ""
    ls, lv, lop = _expression(rng, depth - 1)
    rs, rv, rop = _expression(rng, depth - 1)
    op = rng.choice("+-*/")
    if op == "/" and rv == 0:
        op = "*"
    if lop in ("+", "-") and op in "*/":
        ls = f"({ls})"
    if rop and (op in "*/" or (op == "-" and rop in ("+", "-"))):
        rs = f"({rs})"
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else lv}[op]
    return (f"{ls} {op} {rs}" if op in "+-" else f"{ls}{op}{rs}"), value, op


def _mixed(rng: random.Random) -> tuple[str, str]:
    while True:
        text, value, op = _expression(rng, rng.randint(2, 3))
        if op and value.denominator <= 20 and abs(value) < 10**6:
            break
    template = rng.choice(["Calculate {e}.", "What is the value of {e}?", "Evaluate {e}."])
    return template.format(e=text), fmt_number(value)


def _linear_1d(rng: random.Random) -> tuple[str, str]:
    v, x = rng.choice(_VARS), rng.randint(-12, 12)
    a, b = _nonzero(rng, -9, 9), rng.randint(-30, 30)
    if rng.random() < 0.5:
        lhs, rhs = fmt_poly([b, a], v), str(a * x + b)
    else:
        d = rng.choice([c for c in range(-9, 10) if c not in (0, a)])
        e = a * x + b - d * x
        lhs, rhs = fmt_poly([b, a], v), fmt_poly([e, d], v)
    return f"Solve {lhs} = {rhs} for {v}.", str(x)


def _linear_2d(rng: random.Random) -> tuple[str, str]:
    u, w = rng.sample(_VARS, 2)
    x, y = rng.randint(-10, 10), rng.randint(-10, 10)
    while True:
        a1, b1, a2, b2 = (_nonzero(rng, -7, 7) for _ in range(4))
        if a1 * b2 - a2 * b1 != 0:
            break

    def side(a: int, b: int) -> str:
        return f"{fmt_poly([0, a], u)}{' - ' if b < 0 else ' + '}{fmt_poly([0, abs(b)], w)}"

    ask = rng.choice([u, w])
    eq1, eq2 = f"{side(a1, b1)} = {a1 * x + b1 * y}", f"{side(a2, b2)} = {a2 * x + b2 * y}"
    return f"Solve {eq1}, {eq2} for {ask}.", str(x if ask == u else y)


def _poly_coeffs(rng: random.Random, degree: int) -> list[int]:
    return [rng.randint(-9, 9) for _ in range(degree)] + [_nonzero(rng, -9, 9)]


def _poly_eval_module(rng: random.Random) -> tuple[str, str]:
    f, v = rng.choice(_FUNCS), rng.choice(_VARS)
    coeffs, x = _poly_coeffs(rng, rng.randint(1, 3)), rng.randint(-6, 6)
    ask = rng.choice(["What is {f}({x})?", "Calculate {f}({x}).", "Give {f}({x})."]).format(f=f, x=x)
    return f"Let {f}({v}) = {fmt_poly(coeffs, v)}. {ask}", str(_poly_eval(coeffs, x))


def _expand(rng: random.Random) -> tuple[str, str]:
    v = rng.choice(_VARS)
    p, q = _poly_coeffs(rng, 1), _poly_coeffs(rng, rng.randint(1, 2))
    template = rng.choice(["Expand ({p})*({q}).", "Expand ({p})*({q}) and simplify."])
    return template.format(p=fmt_poly(p, v), q=fmt_poly(q, v)), fmt_poly(_poly_mul(p, q), v)


def _differentiate(rng: random.Random) -> tuple[str, str]:
    v = rng.choice(_VARS)
    coeffs = _poly_coeffs(rng, rng.randint(2, 5))
    derivative = [k * c for k, c in enumerate(coeffs)][1:]
    template = rng.choice(
        ["Find the first derivative of {p} wrt {v}.", "Differentiate {p} with respect to {v}."]
    )
    return template.format(p=fmt_poly(coeffs, v), v=v), fmt_poly(derivative, v)


def _pair_question(rng: random.Random, g: tuple[int, int], k: tuple[int, int], templates: tuple[str, ...],
                   answer) -> tuple[str, str]:  # fmt: skip
    """A question on a, b = g·k1, g·k2 (a common factor g, so the answer is not always trivial)."""
    common = rng.randint(*g)
    a, b = common * rng.randint(*k), common * rng.randint(*k)
    return rng.choice(templates).format(a=a, b=b), str(answer(a, b))


def _gcd(rng: random.Random) -> tuple[str, str]:
    templates = ("What is the greatest common divisor of {a} and {b}?",
                 "Calculate the highest common factor of {a} and {b}.")  # fmt: skip
    return _pair_question(rng, (2, 60), (1, 40), templates, math.gcd)


def _lcm(rng: random.Random) -> tuple[str, str]:
    templates = ("What is the lowest common multiple of {a} and {b}?",
                 "Calculate the smallest common multiple of {a} and {b}.")  # fmt: skip
    return _pair_question(rng, (1, 20), (2, 30), templates, lambda a, b: a * b // math.gcd(a, b))


def _is_prime_module(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        n = rng.randint(2, 100_000)
        while not _is_prime(n):
            n += 1
    else:
        n = rng.randint(2, 400) * rng.randint(2, 400)
    if rng.random() < 0.25:
        return f"Is {n} composite?", str(not _is_prime(n))
    return rng.choice(["Is {n} a prime number?", "Is {n} prime?"]).format(n=n), str(_is_prime(n))


def _prime_factors(rng: random.Random) -> tuple[str, str]:
    primes = [p for p in range(2, 100) if _is_prime(p)]
    factors = [rng.choice(primes[: rng.choice([4, 10, 25])]) for _ in range(rng.randint(2, 5))]
    n = math.prod(factors)
    template = rng.choice(["What are the prime factors of {n}?", "List the prime factors of {n}."])
    return template.format(n=n), ", ".join(str(p) for p in sorted(set(factors)))


def _sort(rng: random.Random) -> tuple[str, str]:
    values: list[Fraction | Decimal] = []
    n = rng.randint(3, 6)
    while len(values) < n:
        v = _rational(rng)
        if all(Fraction(v) != Fraction(w) for w in values):
            values.append(v)
    descending = rng.random() < 0.5
    order = sorted(values, key=Fraction, reverse=descending)
    words = rng.choice(["decreasing", "descending"] if descending else ["increasing", "ascending"])
    text = ", ".join(fmt_number(v) for v in values)
    template = rng.choice(["Sort {xs} in {w} order.", "Put {xs} in {w} order."])
    return template.format(xs=text, w=words), ", ".join(fmt_number(v) for v in order)


def _compare(rng: random.Random) -> tuple[str, str]:
    a, b = _rational(rng), _rational(rng)
    while Fraction(a) == Fraction(b):
        b = _rational(rng)
    fa, fb = fmt_number(a), fmt_number(b)
    kind = rng.randrange(3)
    if kind == 0:
        return f"Which is bigger: {fa} or {fb}?", fa if Fraction(a) > Fraction(b) else fb
    if kind == 1:
        return f"Which is smaller: {fa} or {fb}?", fa if Fraction(a) < Fraction(b) else fb
    return f"Is {fa} greater than {fb}?", str(Fraction(a) > Fraction(b))


# Units in size order within each quantity, with their size in the smallest unit. Time converts
# only from a larger to a smaller unit so that every answer is a terminating decimal.
_UNITS: dict[str, list[tuple[str, int]]] = {
    "length": [("millimetres", 1), ("centimetres", 10), ("metres", 1000), ("kilometres", 1_000_000)],
    "mass": [("milligrams", 1), ("grams", 1000), ("kilograms", 1_000_000), ("tonnes", 1_000_000_000)],
    "volume": [("millilitres", 1), ("litres", 1000)],
    "time": [("seconds", 1), ("minutes", 60), ("hours", 3600), ("days", 86400), ("weeks", 604800)],
}


def _units(rng: random.Random) -> tuple[str, str]:
    quantity = rng.choice(sorted(_UNITS))
    (src, src_size), (dst, dst_size) = rng.sample(_UNITS[quantity], 2)
    if quantity == "time" and src_size < dst_size:
        (src, src_size), (dst, dst_size) = (dst, dst_size), (src, src_size)
    value = Decimal(rng.randint(1, 9999)) / Decimal(10 ** rng.randint(0, 2))
    answer = value * Decimal(src_size) / Decimal(dst_size)  # exact: metric factors are powers of ten
    template = rng.choice(
        ["How many {d} are there in {v} {s}?", "Convert {v} {s} to {d}.", "What is {v} {s} in {d}?"]
    )
    return template.format(d=dst, v=fmt_number(value), s=src), fmt_number(answer)


_NUMBER_WORDS = {2: "Two", 3: "Three"}


def _probability(rng: random.Random) -> tuple[str, str]:
    letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(2, 4))
    counts = {c: rng.randint(1, 6) for c in letters}
    total, k = sum(counts.values()), rng.randint(2, 3)
    if total < k:
        counts[letters[0]] += k
        total += k
    bag = "{" + ", ".join(f"{c}: {n}" for c, n in counts.items()) + "}"
    head = f"{_NUMBER_WORDS[k]} letters picked without replacement from {bag}."
    draw = rng.sample([c for c in letters for _ in range(counts[c])], k)
    if rng.random() < 0.5:  # an ordered sequence: product of conditional probabilities
        p, left = Fraction(1), dict(counts)
        for i, c in enumerate(draw):
            p *= Fraction(left[c], total - i)
            left[c] -= 1
        return f"{head} What is prob of sequence {''.join(draw)}?", fmt_number(p)
    wanted = {c: draw.count(c) for c in sorted(set(draw))}  # multivariate hypergeometric
    p = Fraction(math.prod(math.comb(counts[c], n) for c, n in wanted.items()), math.comb(total, k))
    spec = " and ".join(f"{n} {c}" for c, n in wanted.items())
    return f"{head} What is prob of picking {spec}?", fmt_number(p)


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "mixed": _mixed,
    "linear_1d": _linear_1d,
    "linear_2d": _linear_2d,
    "poly_eval": _poly_eval_module,
    "expand": _expand,
    "differentiate": _differentiate,
    "gcd": _gcd,
    "lcm": _lcm,
    "is_prime": _is_prime_module,
    "prime_factors": _prime_factors,
    "sort": _sort,
    "compare": _compare,
    "units": _units,
    "probability": _probability,
}

MODULES: tuple[str, ...] = tuple(_GENERATORS)


# ---------------------------------------------------------------- public API


def _check_modules(modules: Sequence[str] | None) -> tuple[str, ...]:
    chosen = MODULES if modules is None else tuple(modules)
    unknown = [m for m in chosen if m not in _GENERATORS]
    if unknown or not chosen:
        raise DataError(f"unknown math modules {unknown or '(none given)'}; choose from {', '.join(MODULES)}")
    return chosen


def generate_item(module: str, rng: random.Random) -> MathItem:
    """One item of `module` drawn with `rng`."""
    (module,) = _check_modules([module])
    question, answer = _GENERATORS[module](rng)
    return MathItem(module=module, question=question, answer=answer)


def item_at(index: int, seed: int = 0, modules: Sequence[str] | None = None) -> MathItem:
    """Item `index` of the stream `iter_items(seed, modules)`, computed on its own."""
    chosen = _check_modules(modules)
    # A string seed goes through SHA-512 in random.seed, so it is stable across runs and platforms.
    return generate_item(chosen[index % len(chosen)], random.Random(f"mathgen:{seed}:{index}"))


def iter_items(seed: int = 0, modules: Sequence[str] | None = None, start: int = 0) -> Iterator[MathItem]:
    """The endless item stream of `seed`, from item `start` on."""
    chosen = _check_modules(modules)
    for index in count(start):
        yield item_at(index, seed, chosen)


def generate(n: int, seed: int = 0, modules: Sequence[str] | None = None) -> list[MathItem]:
    """The first `n` items of `iter_items(seed, modules)`."""
    chosen = _check_modules(modules)
    return [item_at(i, seed, chosen) for i in range(n)]
