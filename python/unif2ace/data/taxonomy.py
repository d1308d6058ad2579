"""The SynthFace attribute taxonomy: categories, values, how each value is said in words.

In the spirit of UniF²aceD-1M's fine-grained face attributes, kept to what a 64 px drawing shows
without doubt (the attribute judge must read every value back at ≥ 97 %).

A category is *identity-level* when it is part of a person's fixed look (face geometry, skin, eyes,
natural hair colour, brows) and *image-level* when it changes from photo to photo (expression,
accessories, hair cut, background...). An attribute can be hidden in one image (eye colour behind
sunglasses, mouth behind a mask, hair colour of a bald head): its value is then ``None`` in the
attribute file, the caption does not mention it, no question asks about it and the judge does not
score it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    name: str  # machine name, a key of the attribute records
    values: tuple[str, ...]  # machine values
    identity: bool  # fixed per identity (True) or drawn per image (False)
    words: dict[str, str]  # value -> noun phrase used in captions and open answers
    question: str  # open question
    none_value: str | None = None  # the "absent" value (no glasses, no hat...) if there is one
    noun: str = ""  # "glasses", "hat": presence question "Is the person wearing any {noun}?"


def _c(name, values, identity, words, question, none_value=None, noun=""):
    """A category; ``words["*"]``, when given, is the phrase of every value not listed, with
    ``{}`` standing for the value (a value with neither is said as itself)."""
    words = {v: words.get(v, words["*"].format(v) if "*" in words else v) for v in values}
    return Category(name, tuple(values), identity, words, question, none_value, noun)


# fmt: off
CATEGORIES: tuple[Category, ...] = (
    _c("face_shape", ["oval", "round", "square"], True,
       {"*": "a {} face", "oval": "an oval face"},
       "What shape is the person's face?"),
    _c("skin_tone", ["fair", "tan", "brown", "dark"], True,
       {"*": "{} skin"},
       "What is the person's skin tone?"),
    _c("eye_colour", ["blue", "green", "brown"], True,
       {"*": "{} eyes"},
       "What colour are the person's eyes?"),
    _c("hair_colour", ["black", "brown", "blonde", "red", "grey"], True,
       {"*": "{} hair"},
       "What colour is the person's hair?"),
    _c("eyebrows", ["thin", "thick"], True,
       {"*": "{} eyebrows"},
       "Are the person's eyebrows thin or thick?"),
    _c("hair_length", ["bald", "short", "medium", "long"], False,
       {"*": "{} hair", "bald": "a bald head", "medium": "shoulder-length hair"},
       "How long is the person's hair?"),
    _c("hair_style", ["straight", "wavy", "curly"], False,
       {"*": "{} hair"},
       "Is the person's hair straight, wavy or curly?"),
    _c("bangs", ["no", "yes"], False,
       {"no": "no bangs", "yes": "bangs"},
       "Does the person have bangs?", none_value="no", noun="bangs"),
    _c("glasses", ["none", "round", "square", "sunglasses"], False,
       {"*": "{} glasses", "none": "no glasses", "sunglasses": "sunglasses"},
       "What kind of glasses is the person wearing?", none_value="none", noun="glasses"),
    _c("beard", ["none", "stubble", "goatee", "full"], False,
       {"none": "no beard", "goatee": "a goatee", "full": "a full beard"},
       "What kind of beard does the person have?", none_value="none", noun="beard"),
    _c("moustache", ["no", "yes"], False,
       {"no": "no moustache", "yes": "a moustache"},
       "Does the person have a moustache?", none_value="no", noun="moustache"),
    _c("expression", ["neutral", "smile", "laugh", "surprised"], False,
       {"*": "a {}", "neutral": "a neutral expression", "surprised": "a surprised expression"},
       "What is the person's facial expression?"),
    _c("lipstick", ["none", "red"], False,
       {"none": "no lipstick", "red": "red lipstick"},
       "Is the person wearing lipstick?", none_value="none", noun="lipstick"),
    _c("earrings", ["none", "hoops"], False,
       {"none": "no earrings", "hoops": "hoop earrings"},
       "Is the person wearing earrings?", none_value="none", noun="earrings"),
    _c("hat", ["none", "cap", "beanie", "fedora"], False,
       {"*": "a {}", "none": "no hat", "cap": "a baseball cap"},
       "What kind of hat is the person wearing?", none_value="none", noun="hat"),
    _c("mask", ["none", "surgical", "black"], False,
       {"none": "no face mask", "surgical": "a light blue surgical mask",
        "black": "a black face mask"},
       "What kind of face mask is the person wearing?", none_value="none", noun="face mask"),
    _c("clothing", ["red", "blue", "green", "white", "black"], False,
       {"*": "a {} shirt"},
       "What colour is the person's shirt?"),
    _c("background", ["blue", "green", "grey", "pink", "yellow", "white"], False,
       {"*": "a {} background"},
       "What colour is the background?"),
)
# fmt: on

CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
BY_NAME: dict[str, Category] = {c.name: c for c in CATEGORIES}
NUM_VALUES: tuple[int, ...] = tuple(len(c.values) for c in CATEGORIES)


def value_index(category: str, value: str | None) -> int:
    """Index of ``value`` in its category, -1 for a hidden (``None``) attribute."""
    if value is None:
        return -1
    return BY_NAME[category].values.index(value)


def encode_attributes(attrs: dict[str, str | None]) -> list[int]:
    """Attribute dict -> one class index per category (in CATEGORIES order), -1 where hidden."""
    return [value_index(c.name, attrs.get(c.name)) for c in CATEGORIES]


def taxonomy_dict() -> dict:
    """JSON-able description of the taxonomy (written to ``meta.json``)."""
    return {
        c.name: {"values": list(c.values), "identity": c.identity, "none_value": c.none_value}
        for c in CATEGORIES
    }
