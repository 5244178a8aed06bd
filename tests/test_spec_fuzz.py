"""Fuzzing: whatever the text, cnnspec.loads either returns a Network or raises SpecError."""

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnnspec
from cnnspec import Problem

SPECS = Path(__file__).resolve().parent.parent / "specs"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(FUZZ, max_examples=80)  # examples that build whole networks


def check(text):
    try:
        net = cnnspec.loads(text, file="fuzz.yaml")
    except cnnspec.SpecError as exc:
        assert exc.problems
        for p in exc.problems:
            assert isinstance(p, Problem)
            assert isinstance(p.message, str) and p.message
            assert p.severity in ("error", "warning")
            assert p.file == "fuzz.yaml"
            assert p.line >= 0 and p.col >= 0
            p.format()
        return
    net.summary()  # whatever loads can be summarised


# ---- YAML-ish text ------------------------------------------------------------------

WORD_FRAGMENTS = """name: input: layers: blocks: params: train: type: inputs: output: filters:
    kernel: stride: padding: units: repeat: when: conv2d relu dense concat add softmax maxpool2d
    conv_transpose2d in input same false true null ~ .nan .inf -1 1e5 0x1F 0o17 2001-12-14
    [3,8,8] [1,2] {} [] { } [ ] , : - ' " # &a *a <<: !!int !!str !!binary !!timestamp
    !!python/object:os.system ? | > --- ... %YAML \\ @ ` % ! é""".split()
FRAGMENTS = WORD_FRAGMENTS + [" ", ": ", "- ", "\n", "\n  ", "\n    ", "\t", "\u2028", "\ufeff"]
FRAGMENTS += ["\x00", "\x85", "[3, 8, 8]", "  - {type: relu}", "%YAML 1.1\n", "kernel: 3"]
FRAGMENTS += list("0123456789") + ["${", "}", "!!float", "!!bool", "<<: *a"]


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40))
def test_fuzz_yaml_like_text(parts):
    check("".join(parts))


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text(text):
    check(text)


# ---- random documents ----------------------------------------------------------------

KEYS = """type name inputs filters kernel stride padding dilation groups units repeat when params
    layers output input blocks ceil_mode connections output_padding channels pieces rate bias
    comment x""".split()
WORDS = """conv2d conv relu dense concat add maxpool2d avgpool2d softmax rbf subsample2d channel_pad
    maxout batchnorm2d global_avgpool2d flatten conv_transpose2d dropout lrn in input same full
    valid a b layer1""".split()
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(alphabet="abc_-.0123 ", max_size=5),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=8,
)
layers = st.lists(
    st.dictionaries(st.sampled_from(KEYS), values, max_size=6).map(
        lambda d: d if "type" in d or not d else {**d, "type": "relu"}
    ),
    max_size=6,
)
blocks = st.dictionaries(
    st.sampled_from(["a", "b", "conv2d", "1x"]),
    st.fixed_dictionaries(
        {"layers": layers},
        optional={
            "params": st.dictionaries(
                st.sampled_from(["x", "filters", "index"]), values, max_size=3
            ),
            "output": scalars,
            "comment": scalars,
        },
    ),
    max_size=2,
)
documents = st.fixed_dictionaries(
    {"layers": layers},
    optional={
        "input": st.one_of(
            st.just([3, 8, 8]),
            st.lists(scalars, max_size=4),
            st.none(),
            st.dictionaries(st.sampled_from(KEYS), scalars, max_size=2),
        ),
        "name": values,
        "blocks": blocks,
        "train": values,
        "extra": values,
    },
)


@HEAVY
@given(documents)
def test_fuzz_random_documents(doc):
    check(yaml.safe_dump(doc, sort_keys=False))


@FUZZ
@given(st.one_of(values, st.lists(values), st.dictionaries(st.sampled_from(KEYS), values)))
def test_fuzz_random_structures(data):
    check(yaml.safe_dump(data))


# ---- mutated classics ------------------------------------------------------------------

CLASSICS = [
    (SPECS / f"{n}.yaml").read_text()
    for n in ("lenet5", "lenet5-1998", "alexnet", "vgg16", "googlenet")
]


@HEAVY
@given(st.sampled_from(CLASSICS), st.data())
def test_fuzz_mutated_classics(text, data):
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 30)))
        op = data.draw(st.sampled_from(["delete", "duplicate", "insert", "replace"]))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif op == "insert":
            text = text[:i] + data.draw(st.sampled_from(FRAGMENTS)) + text[i:]
        else:
            text = text[:i] + data.draw(st.sampled_from("0123456789[]{},:- \n#abc")) + text[i + 1 :]
    check(text)
